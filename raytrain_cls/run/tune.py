"""`raytrain-cls tune`: a Ray Tune search over any config key, each trial a full training run.

Ray 2.60 (Train V2) cannot take a trainer as a Tune trainable; a trial is a plain function that builds and fits a
TorchTrainer (trainer.fit_run) and forwards each epoch's metrics to Tune through a Train callback, or, with
--in-process, trains its one worker's loop in the trial's own process (run/trial_process.py). Each trial's run
is named after its trial id under <search dir>/trials/, so a resumed search resumes each unfinished trial from
its own checkpoints. Everything in the search spec is checked before any trial starts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from raytrain_cls.core.config import FIELDS, Config, ConfigError, _suggest, parse_worker_count, read_yaml
from raytrain_cls.core.facts import RunFacts
from raytrain_cls.core.optim import resolve_num_epochs
from raytrain_cls.core.storage import absolute, exists, is_uri, join, split, write_text
from raytrain_cls.run.capacity import UNREAD_LIMITS_HINT, has
from raytrain_cls.run.checkpointer import resolve_output
from raytrain_cls.run.driver import check_output, connect, resolve_scaling
from raytrain_cls.run.plots import plot_curves
from raytrain_cls.run.preflight import preflight
from raytrain_cls.run.report import PLACEMENT_GROUP_METRIC, trial_run_dir
from raytrain_cls.run.startup import breakdown
from raytrain_cls.run.trial import run_trial
from raytrain_cls.run.worker import EMA_EPOCH_METRICS, EPOCH_METRICS

SEARCH_FILE, TRIALS_FILE, BEST_FILE, PLOT_FILE = "search.yaml", "trials.csv", "best.yaml", "trials.png"
DEFAULT_OUTPUT = "output/tune"
# kind -> number of numeric arguments (None: a list of values)
SPACE_KINDS = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "qrandint": 3,
    "choice": None,
    "grid": None,
}
DEFAULT_SPACE = {"lr": "loguniform:1e-4:1e-1", "mixup": "uniform:0:0.4", "smoothing": "uniform:0:0.2"}
SCHEDULERS = ("asha", "fifo", "pbt")
SEARCHERS = ("random", "optuna")


@dataclass
class SearchSpec:
    space: dict = field(default_factory=dict)  # config key -> (kind, args)
    num_samples: int = 8
    metric: str = ""  # default: eval_<checkpoint.eval_metric>
    mode: str = ""  # default: min for a loss, else max
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    searcher: str = "random"
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    workers_per_trial: int | list = 1  # or [MIN, MAX]: each trial an elastic run
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions (0.25) let small trials share a GPU
    # One-worker trials train in Tune's trial process, which the next trial reuses: no Ray Train run per trial
    # (run/trial_process.py). Seconds less per trial; a search of many short trials spends its time training.
    in_process: bool = False


SPEC_KEYS = [f.name for f in dataclasses.fields(SearchSpec)]


# ---- parsing -------------------------------------------------------------------------------------------------
def parse_dimension(key: str, spec: Any) -> tuple[str, list]:
    """'loguniform:1e-4:1e-1' | {'loguniform': [1e-4, 1e-1]} | [a, b, c] (a choice) -> (kind, args)."""
    where = f"search.space.{key}"
    items = None  # the string form's items, still text
    if isinstance(spec, list):
        return "choice", list(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        kind, args = next(iter(spec.items()))
        # `{choice: }` in YAML is None: no values, not the one value None
        args = [] if args is None else list(args) if isinstance(args, (list, tuple)) else [args]
    elif isinstance(spec, str) and ":" in spec:
        kind, _, rest = spec.partition(":")
        sep = "," if kind in ("choice", "grid") else ":"
        # "choice:" split would be [""], which YAML reads as None: one trial value nobody asked for
        items = rest.split(sep) if rest.strip() else []
        args = []
    else:
        raise ConfigError(
            where,
            spec,
            "expected KIND:ARGS (e.g. loguniform:1e-4:1e-1, choice:sgd,adamw), {KIND: [args]} or a list of choices",
        )
    if kind not in SPACE_KINDS:
        raise ConfigError(
            where,
            spec,
            f"unknown distribution '{kind}'; choose one of {list(SPACE_KINDS)}{_suggest(kind, SPACE_KINDS)}",
        )
    if items is not None:
        if not items and SPACE_KINDS[kind] is None:
            raise ConfigError(where, spec, f"{kind} lists no values; give at least one, e.g. {kind}:a,b")
        empty = [n for n, item in enumerate(items, 1) if not item.strip()]
        if empty:
            # An empty item reads as None, a value nobody meant (whoever does, writes null)
            raise ConfigError(
                where,
                spec,
                f"value {', '.join(map(str, empty))} of {len(items)} is empty: separate values by a single "
                f"'{sep}' with nothing after the last",
            )
        args = [_scalar(item) for item in items]
    return kind, args


def _scalar(text: str) -> Any:
    """'1e-4' -> 0.0001 (PyYAML reads it as a string), '32' -> 32, 'sgd' -> 'sgd', 'true' -> True."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_search(raw: Optional[dict], cli_space: Optional[dict] = None, cli: Optional[dict] = None) -> SearchSpec:
    """The `search:` block of a search YAML, then command-line --search / options on top."""
    raw = dict(raw or {})
    spec = SearchSpec()
    for key, value in {**raw, **(cli or {})}.items():
        if key == "space":
            continue
        if key not in SPEC_KEYS:
            raise ConfigError(f"search.{key}", value, f"unknown key{_suggest(key, SPEC_KEYS)}")
        default = getattr(spec, key)
        if key == "workers_per_trial":
            spec.workers_per_trial = _worker_count(value)
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"search.{key}", value, "expected true or false")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"search.{key}", value, "expected a name")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"search.{key}", value, "expected a number")
        elif isinstance(default, int) and not float(value).is_integer():
            # int() would quietly make num_samples 2.5 into 2 trials
            raise ConfigError(f"search.{key}", value, "expected a whole number")
        setattr(spec, key, type(default)(value))
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError("search.space", space, "expected a mapping of config keys to distributions")
    space = {**space, **(cli_space or {})} or dict(DEFAULT_SPACE)
    spec.space = {key: parse_dimension(key, value) for key, value in space.items()}
    return spec


def _worker_count(value: Any) -> int | list:
    """--workers-per-trial N or MIN:MAX (YAML: N or [MIN, MAX]), read as the training config reads --num-workers."""
    try:
        count = parse_worker_count(value)
    except ConfigError as e:
        raise ConfigError("search.workers_per_trial", value, e.reason) from None
    ends = count if isinstance(count, list) else [count]
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in ends)
    if not whole or (isinstance(count, list) and len(count) != 2):
        raise ConfigError("search.workers_per_trial", value, "expected a worker count N or a range MIN:MAX")
    if min(ends) < 1 or ends[0] > ends[-1]:
        raise ConfigError("search.workers_per_trial", value, "must be >= 1, and MIN <= MAX")
    return count


def _shown(count: int | list) -> str:
    return f"{count[0]}:{count[1]}" if isinstance(count, list) else str(count)


def trial_min_workers(spec: SearchSpec) -> int:
    """The workers a trial needs to start: MIN of an elastic range (Ray grows it as the cluster allows)."""
    n = spec.workers_per_trial
    return n[0] if isinstance(n, list) else n


# ---- validation (before any Ray work) ------------------------------------------------------------------------
def _probe(base: Config, key: str, value: Any, where: str) -> None:
    """Apply one value of the space to a copy of the base config and validate it."""
    cfg = base.copy()
    try:
        cfg.set(key, value)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(where, value, f"this value does not make a valid training config: {e.reason}") from None


def validate_search(spec: SearchSpec, base: Config) -> SearchSpec:
    if not spec.space:
        raise ConfigError("search.space", {}, "nothing to search")
    for key, (kind, args) in spec.space.items():
        where = f"search.space.{key}"
        if key not in FIELDS:
            raise ConfigError(where, key, f"not a config key{_suggest(key, FIELDS)}")
        need = SPACE_KINDS[kind]
        if need is None:
            if not args:
                raise ConfigError(where, args, f"{kind} needs at least one value")
            repeated = _repeated(args)
            if repeated:
                # A repeated grid value runs the same trials twice; a repeated choice is drawn twice as often.
                raise ConfigError(
                    where, args, f"lists {', '.join(map(repr, repeated))} more than once; give each value once"
                )
            for value in args:
                _probe(base, key, value, where)
            continue
        if len(args) != need or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(where, args, f"{kind} needs {need} numbers: low, high" + (", q" if need == 3 else ""))
        lo, hi = args[0], args[1]
        if not lo < hi:
            raise ConfigError(where, args, "needs low < high")
        if "log" in kind and lo <= 0:
            raise ConfigError(where, args, "a log-uniform range needs low > 0")
        if need == 3 and args[2] <= 0:
            raise ConfigError(where, args, "the quantum q must be > 0")
        if kind.endswith("randint") and not all(float(a).is_integer() for a in args):
            raise ConfigError(where, args, "randint bounds must be integers")
        for value in (lo, hi):
            _probe(base, key, int(value) if kind.endswith("randint") else value, where)
    for key in SPEC_KEYS:
        value = getattr(spec, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"search.{key}", value, "must be a finite number")
    if spec.num_samples < 1:
        raise ConfigError("search.num_samples", spec.num_samples, "must be >= 1")
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(
            "search.scheduler",
            spec.scheduler,
            f"choose one of {list(SCHEDULERS)}{_suggest(spec.scheduler, SCHEDULERS)}",
        )
    if spec.scheduler == "pbt":
        raise ConfigError(
            "search.scheduler",
            "pbt",
            "not supported: PBT exploits Tune-level checkpoints, and a "
            "Ray Train V2 trial reports its checkpoints to Train, not to Tune; use asha or fifo",
        )
    if spec.searcher not in SEARCHERS:
        raise ConfigError(
            "search.searcher", spec.searcher, f"choose one of {list(SEARCHERS)}{_suggest(spec.searcher, SEARCHERS)}"
        )
    if spec.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search.searcher",
                "optuna",
                "Optuna is not installed: pip install 'raytrain-cls[optuna]' (or use the default random searcher)",
            ) from None
        if any(kind == "grid" for kind, _ in spec.space.values()):
            raise ConfigError("search.searcher", "optuna", "Optuna cannot take grid dimensions; use choice")
    if spec.grace_period < 1:
        raise ConfigError("search.grace_period", spec.grace_period, "must be >= 1")
    if spec.reduction_factor <= 1:
        raise ConfigError("search.reduction_factor", spec.reduction_factor, "must be > 1")
    if spec.max_concurrent_trials < 0:
        raise ConfigError("search.max_concurrent_trials", spec.max_concurrent_trials, "must be >= 0 (0 = auto)")
    if spec.cpus_per_worker <= 0:
        raise ConfigError("search.cpus_per_worker", spec.cpus_per_worker, "must be > 0")
    g = spec.gpus_per_worker
    if g < 0 or (g > 1 and not float(g).is_integer()):
        raise ConfigError("search.gpus_per_worker", g, "must be a fraction in [0, 1] or a whole number")
    if spec.mode and spec.mode not in ("min", "max"):
        raise ConfigError("search.mode", spec.mode, "must be min or max")
    if spec.metric:
        check_metric(spec.metric, base)
    if spec.in_process:
        check_in_process(spec, base)
    return spec


def check_in_process(spec: SearchSpec, base: Config) -> None:
    """What a trial training in Tune's own process (run/trial_process.py) cannot do, refused before any trial."""
    if spec.workers_per_trial != 1:
        raise ConfigError(
            "search.workers_per_trial",
            _shown(spec.workers_per_trial),
            "--in-process trials train on one worker, in the trial's own process; drop --in-process to give each "
            "trial a Ray Train run of several workers",
        )
    if spec.gpus_per_worker > 1:
        raise ConfigError("search.gpus_per_worker", spec.gpus_per_worker, "an --in-process trial uses one GPU at most")
    if base.data.loader == "ray":
        raise ConfigError(
            "data.loader", "ray", "Ray Data's input reaches Ray Train workers only; drop --in-process or the loader"
        )
    output = base.checkpoint.output or DEFAULT_OUTPUT
    if is_uri(output):
        raise ConfigError(
            "checkpoint.output",
            output,
            "an --in-process trial keeps its checkpoints in a local (or mounted) search directory; drop "
            "--in-process to keep them on cloud storage through Ray Train",
        )


def _repeated(values: list) -> list:
    """The values a list holds more than once. 1 and 1.0 are the same trial; True and 1 are not (a bool key would
    refuse the 1)."""

    def same(a: Any, b: Any) -> bool:
        return isinstance(a, bool) == isinstance(b, bool) and a == b

    repeated: list = []  # each as first listed
    for i, value in enumerate(values):
        first = next((j for j in range(i) if same(value, values[j])), None)
        if first is not None and not any(same(value, r) for r in repeated):
            repeated.append(values[first])
    return repeated


def trial_metrics(base: Config) -> tuple[str, ...]:
    """The numbers each epoch of a trial of this config reports, by which Tune can score it (run/worker.py)."""
    return EPOCH_METRICS + (EMA_EPOCH_METRICS if base.ema.model_ema else ())


def check_metric(metric: str, base: Config) -> None:
    """A metric no trial reports would fail only after the first trial trained an epoch, as Tune's own error."""
    if metric in trial_metrics(base):
        return
    if metric in EMA_EPOCH_METRICS:
        raise ConfigError(
            "search.metric",
            metric,
            "reported only with --model-ema (the raw model's score beside the EMA's eval_*); "
            f"use {metric.removeprefix('model_')} or add --model-ema",
        )
    metrics = trial_metrics(base)
    raise ConfigError(
        "search.metric",
        metric,
        f"not a metric a trial reports; one of {', '.join(metrics)}{_suggest(metric, metrics)}",
    )


def check_trial_resources(spec: SearchSpec, cluster: dict) -> None:
    """Refuse trials the cluster can never schedule, before the Tuner starts: otherwise Tune starts every trial
    into the same failure. ``cluster``: what the cluster has or its autoscaler can grow it to (capacity.py; math.inf
    for no limit). Totals only: Ray tells no per-node limits of nodes an autoscaler has yet to add."""
    workers = trial_min_workers(spec)
    for resource, per_worker, option in (
        ("GPU", spec.gpus_per_worker, "gpus_per_worker"),
        ("CPU", spec.cpus_per_worker, "cpus_per_worker"),
    ):
        available = cluster.get(resource, 0)
        flag = "--" + option.replace("_", "-")
        if per_worker > available:
            on_cpus = f"; {flag} 0 trains on CPUs" if resource == "GPU" and not available else ""
            raise ConfigError(
                f"search.{option}",
                per_worker,
                f"each trial worker needs {_amount(per_worker, resource)} but {has(cluster, resource)}{on_cpus} "
                f"({UNREAD_LIMITS_HINT})",
            )
        if workers * per_worker > available:
            raise ConfigError(
                "search.workers_per_trial",
                workers,
                f"a trial's {workers} workers need {_amount(workers * per_worker, resource)} ({per_worker:g} each) "
                f"but {has(cluster, resource)}; lower --workers-per-trial or {flag} ({UNREAD_LIMITS_HINT})",
            )


def _amount(count: float, resource: str) -> str:
    return f"{count:g} {resource}{'' if count == 1 else 's'}"


def metric_and_mode(spec: SearchSpec, base: Config) -> tuple[str, str]:
    metric = spec.metric or f"eval_{base.checkpoint.eval_metric}"
    return metric, spec.mode or ("min" if metric.endswith("loss") else "max")


def trial_base(base: Config, spec: SearchSpec) -> Config:
    """The base config with the per-trial scaling applied (each trial a Ray Train run of this size)."""
    cfg = base.copy()
    cfg.scaling.num_workers = spec.workers_per_trial
    cfg.scaling.use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        resources["GPU"] = spec.gpus_per_worker
    cfg.scaling.resources_per_worker = resources
    cfg.checkpoint.experiment = ""
    cfg.checkpoint.resume = ""
    cfg.resolved = None
    return cfg


def max_epochs(base: Config, spec: SearchSpec) -> int:
    """ASHA's max_t: the longest schedule any trial can run (cooldown included), resolved without a model."""
    longest = 0
    candidates = [{}]
    for key in ("epochs", "cooldown_epochs"):
        if key in spec.space:
            kind, args = spec.space[key]
            values = args if SPACE_KINDS[kind] is None else args[:2]
            candidates = [{**c, key: int(v)} for c in candidates for v in values]
    for overrides in candidates:
        cfg = base.copy().update(overrides)
        longest = max(longest, resolve_num_epochs(cfg))
    return longest


# ---- Ray Tune ------------------------------------------------------------------------------------------------
def to_tune_space(spec: SearchSpec) -> dict:
    from ray import tune

    out = {}
    for key, (kind, args) in spec.space.items():
        if kind in ("choice", "grid"):
            out[key] = tune.choice(args) if kind == "choice" else tune.grid_search(args)
        elif kind.endswith("randint"):
            out[key] = getattr(tune, kind)(*[int(a) for a in args])
        else:
            out[key] = getattr(tune, kind)(*args)
    return out


def _stopped_trial_cleaner(grace_s: float = 5.0):
    """A Tune callback that frees the placement group of every trial that has ended.

    Ray Train removes a run's placement group itself when the run ends, but not when its controller dies while the
    driver lives on, as when Tune stops a trial early. Ray Train's answer, a detached cleaner actor that asks the
    dashboard's state API whether the controller is gone, costs every run an actor process that the workers wait
    for and cannot work at all without the dashboard, so no run starts it (run/ray_trainer.py). Without this
    callback a stopped trial's workers would keep their CPUs and GPUs for good and the search would wait forever
    for resources. So the search driver removes, a few seconds after Tune ended a trial (time for its controller
    to die with it), the group the trial last reported."""
    from ray import PlacementGroupID, tune
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    class FreeEndedTrials(tune.Callback):
        def __init__(self):
            self.pending: dict[str, float] = {}  # placement group hex id -> when its trial ended

        def _ended(self, trial) -> None:
            group = (trial.last_result or {}).get(PLACEMENT_GROUP_METRIC)
            if group:
                self.pending.setdefault(group, time.monotonic())

        def _free(self, older_than: float) -> None:
            for group, ended in list(self.pending.items()):
                if ended > older_than:
                    continue
                del self.pending[group]
                handle = PlacementGroup(PlacementGroupID.from_hex(group))
                try:
                    if placement_group_table(handle).get("state") not in (None, "REMOVED"):
                        remove_placement_group(handle)
                except Exception:  # gone already, or the cluster is going away: nothing left to free
                    pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial)

        def on_step_begin(self, iteration, trials, **info):
            self._free(time.monotonic() - grace_s)

        def on_experiment_end(self, trials, **info):
            self._free(float("inf"))

    return FreeEndedTrials()


MAX_DEFAULT_CONCURRENCY = 64  # where an autoscaler has no limit (capacity.py: math.inf); Tune queues the rest


def default_concurrency(spec: SearchSpec, cluster: dict) -> int:
    """As many trials at once as the cluster (or what its autoscaler can add) fits."""

    def how_many(available: float, per_trial: float) -> float:
        return available if math.isinf(available) else available // per_trial  # inf // x is nan

    workers = trial_min_workers(spec)
    fits = how_many(cluster.get("CPU", 1), workers * spec.cpus_per_worker)
    if spec.gpus_per_worker:
        fits = min(fits, how_many(cluster.get("GPU", 0), workers * spec.gpus_per_worker))
    return max(1, int(min(fits, MAX_DEFAULT_CONCURRENCY)))


def build_tuner(
    base: Config,
    spec: SearchSpec,
    search_dir: str,
    output: str,
    name: str,
    cluster: dict,
    resume: bool,
    facts: Optional[RunFacts] = None,
):
    """The Tuner of this search; ``facts``: what the checks found for the trials' base config, which a trial whose
    searched keys they never read takes over (core/facts.py)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    metric, mode = metric_and_mode(spec, base)
    trainable = tune.with_parameters(
        run_trial,  # run/trial.py: what a trial's process imports as it unpickles this stays light
        base=trial_base(base, spec).to_dict(),
        search_dir=search_dir,
        in_process=spec.in_process,
        base_facts=facts,
    )
    if spec.in_process:  # the trial trains in its own process: it holds the worker's CPUs/GPUs
        resources = {"cpu": spec.cpus_per_worker, "gpu": spec.gpus_per_worker}
    else:  # the trial function only drives; its TorchTrainer reserves the workers' CPUs/GPUs itself
        resources = {"cpu": 0, "memory": 1}
    trainable = tune.with_resources(trainable, resources)
    if resume:
        return tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs(base, spec),
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    search_alg = None
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=base.run.seed)
    concurrency = spec.max_concurrent_trials or default_concurrency(spec, cluster)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(spec),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=concurrency,
            scheduler=scheduler,
            search_alg=search_alg,
            # An in-process trial's process, with its imports, goes on to the next trial
            reuse_actors=spec.in_process,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=output,
            callbacks=[_stopped_trial_cleaner()],
            # A Ray Train trial recovers inside its fit() (--max-failures there); an in-process trial that failed
            # (its process killed, its node gone) is started again by Tune and resumes from its run directory's
            # newest complete checkpoint.
            failure_config=tune.FailureConfig(max_failures=base.checkpoint.max_failures if spec.in_process else 0),
        ),
    )


# ---- outputs -------------------------------------------------------------------------------------------------
@dataclass
class TrialRow:
    trial_id: str
    status: str  # completed | stopped (early, by the scheduler) | error | unfinished (the search was interrupted)
    params: dict
    best: Optional[float]
    best_epoch: Optional[int]
    epochs: int
    checkpoint: Optional[str]
    curve: list  # the metric per epoch
    startup_s: Optional[float] = None  # the trial process taking the trial to its first training step (startup.py)


UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Tune's trial states short of TERMINATED / ERROR


class SearchInterrupted(Exception):
    """Ctrl-C ended the search early; Tune saved its state, and --resume continues it."""

    def __init__(self, search_dir: str, finished: int, total: int):
        self.search_dir, self.finished, self.total = search_dir, finished, total
        super().__init__(
            f"search interrupted with {finished} of {total} trials finished (trials.csv has the results "
            f"so far). Continue it with: raytrain-cls tune --resume {search_dir}"
        )

    def __reduce__(self):
        # Pickling (Ray, multiprocessing) rebuilds an exception from its message alone by default, which this
        # __init__ does not take.
        return type(self), (self.search_dir, self.finished, self.total), self.__dict__


def saved_states(search_dir: str) -> dict:
    """Trial id -> Tune's state for it, as the search saved it last. Not the ResultGrid's: after Ctrl-C Tune
    saves a running trial as PENDING (so that --resume runs it) but leaves it TERMINATED in memory. {} when the
    state cannot be read."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(search_dir).trials}
    except Exception:  # noqa: BLE001 - no saved state to go by: no trial is called unfinished
        return {}


def total_trials(spec: SearchSpec) -> int:
    """How many trials the search makes: num_samples for each point of the grid dimensions (Tune's rule)."""
    points = 1
    for kind, args in spec.space.values():
        points *= len(args) if kind == "grid" else 1
    return spec.num_samples * points


def summarize(
    results, spec: SearchSpec, base: Config, max_t: int, search_dir: str = "", states: Optional[dict] = None
) -> list[TrialRow]:
    """One row per trial, best first. In a search directory on cloud storage Ray names checkpoints
    bucket-relative; they are given as URIs under the trial's run directory instead. ``states``: Tune's state per
    trial id (default: as saved in ``search_dir``)."""
    metric, mode = metric_and_mode(spec, base)
    states = saved_states(search_dir) if states is None and search_dir else (states or {})
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is not None and "epoch" in df:
            df = df.drop_duplicates(subset="epoch", keep="last").reset_index(drop=True)  # a resumed trial repeats
        curve = [] if df is None or metric not in df else [float(v) for v in df[metric].tolist()]
        trial_id = (r.metrics or {}).get("trial_id") or Path(str(r.path)).name
        best = best_epoch = checkpoint = None
        if curve:
            pick = (min if mode == "min" else max)(range(len(curve)), key=lambda i: curve[i])
            best, best_epoch = curve[pick], int(df["epoch"].iloc[pick]) if "epoch" in df else pick
            if "checkpoint_path" in df:
                checkpoint = df["checkpoint_path"].iloc[pick]
                if checkpoint and is_uri(search_dir):
                    checkpoint = join(trial_run_dir(search_dir, trial_id), Path(checkpoint).name)
        tune_status = states.get(str(trial_id)) or next((v for k, v in states.items() if k in str(trial_id)), None)
        status = (
            "error"
            if r.error
            else "completed"
            if len(curve) >= max_t
            else "unfinished"
            if tune_status in UNFINISHED
            else "stopped"
        )
        params = {k: r.config.get(k) for k in spec.space}
        rows.append(
            TrialRow(
                str(trial_id),
                status,
                params,
                best,
                best_epoch,
                len(curve),
                checkpoint,
                curve,
                trial_startup_s(r.metrics or {}),
            )
        )
    reverse = mode == "max"
    return sorted(rows, key=lambda t: (t.best is None, -t.best if reverse and t.best is not None else t.best or 0))


def trial_startup_s(metrics: dict) -> Optional[float]:
    """Seconds from the trial's process taking the trial (its first import of raytrain_cls) to its first step:
    the fixed cost every trial pays again. Tune may hand the reported ``startup`` stamps back nested or flattened
    ("startup/fit")."""
    stamps = metrics.get("startup") or {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("startup/")}
    result = breakdown({k: v for k, v in stamps.items() if isinstance(v, (int, float))})
    return result["total_s"] if result["until"] == "first_step" else None


def write_trials_csv(path: str, rows: list[TrialRow], keys: list[str], metric: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial_id", "status", *keys, f"best_{metric}", "best_epoch", "epochs", "startup_s", "checkpoint"])
    for t in rows:
        writer.writerow(
            [
                t.trial_id,
                t.status,
                *[t.params.get(k) for k in keys],
                t.best,
                t.best_epoch,
                t.epochs,
                "" if t.startup_s is None else f"{t.startup_s:.1f}",
                t.checkpoint or "",
            ]
        )
    write_text(path, buf.getvalue())


def best_config_yaml(base: Config, best: TrialRow, max_t: int) -> str:
    cfg = base.copy()
    for key, value in best.params.items():
        cfg.set(key, value)
    cfg.resolved = None
    cfg.checkpoint.experiment = ""
    cfg.validate()
    raw = cfg.to_dict()
    raw.pop("resolved")
    header = (
        f"# Best trial {best.trial_id}: {', '.join(f'{k}={v}' for k, v in best.params.items())}\n"
        f"# best metric {best.best} at epoch {best.best_epoch} ({best.epochs} of {max_t} epochs run)\n"
        f"# Retrain from scratch:      raytrain-cls train -c best.yaml\n"
        f"# Start from its weights:    raytrain-cls train -c best.yaml --initial-checkpoint {best.checkpoint}\n"
        f"# Continue that very run:    raytrain-cls train -c best.yaml --resume {best.checkpoint}\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)


def plot_trials(path: str, rows: list[TrialRow], metric: str) -> None:
    curves = [
        (
            f"{t.trial_id} ({t.status}) " + " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()),
            t.status == "completed",
            t.curve,
        )
        for t in rows
    ]
    plot_curves(path, curves, metric)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---- the command ---------------------------------------------------------------------------------------------
def search_paths(base: Config, resume: Optional[str]) -> tuple[str, str, str]:
    """(output, name, search_dir): a new search never reuses a directory; --resume names an existing one."""
    if resume:
        path = absolute(resume)
        if not exists(join(path, SEARCH_FILE)):
            raise ConfigError("--resume", resume, f"not a search directory (no {SEARCH_FILE})")
        return (*split(path), path)
    output = resolve_output(base.checkpoint.output or DEFAULT_OUTPUT)
    name = base.checkpoint.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-search-{base.model.model}"
    search_dir = join(output, name)
    if exists(search_dir):
        raise ConfigError(
            "checkpoint.experiment",
            name,
            f"{search_dir} already exists; continue it with "
            f"`raytrain-cls tune --resume {search_dir}` or pick another --experiment",
        )
    return output, name, search_dir


def tune_search(base: Config, spec: SearchSpec, resume: Optional[str] = None, echo=print) -> dict:
    """Validate everything, run (or resume) the search, write trials.csv / best.yaml / the plot."""
    base.validate()
    validate_search(spec, base)
    output, name, search_dir = search_paths(base, resume)
    metric, mode = metric_and_mode(spec, base)
    max_t = max_epochs(base, spec)
    if not resume:
        check_output(base)
    facts = preflight(trial_base(base, spec)).facts  # before Ray: the base model, its arguments and the data set
    # Before the search directory is made: a search the cluster cannot run leaves nothing behind.
    cluster = connect()
    check_trial_resources(spec, cluster)
    resolve_scaling(trial_base(base, spec), cluster)  # what every trial would fail on (sync-BN on CPUs, ...)
    if not resume:
        raw = base.to_dict()
        raw.pop("resolved")
        raw["search"] = dict(
            dataclasses.asdict(spec), space={k: {kind: args} for k, (kind, args) in spec.space.items()}
        )
        write_text(join(search_dir, SEARCH_FILE), yaml.safe_dump(raw, sort_keys=False))
    echo(f"Search directory: {search_dir}")
    echo(
        f"Searching {', '.join(spec.space)} over {spec.num_samples} trial(s), {spec.scheduler} scheduler, "
        f"{metric} ({mode}), up to {max_t} epochs per trial, {_shown(spec.workers_per_trial)} worker(s) per trial"
        + (", each trial in a reused Tune process" if spec.in_process else "")
    )
    results = build_tuner(base, spec, search_dir, output, name, cluster, bool(resume), facts).fit()
    rows = summarize(results, spec, base, max_t, search_dir)
    keys = list(spec.space)
    write_trials_csv(join(search_dir, TRIALS_FILE), rows, keys, metric)
    plot_trials(join(search_dir, PLOT_FILE), rows, metric)
    scored = [t for t in rows if t.best is not None]
    echo(f"{'trial':<12} {'status':<10} {metric:>12} {'epochs':>6}  params")
    for t in rows[:10]:
        best = "-" if t.best is None else f"{t.best:.4f}"
        echo(
            f"{t.trial_id:<12} {t.status:<10} {best:>12} {t.epochs:>6}  "
            + " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        )
    summary = dict(
        search_dir=search_dir,
        trials=len(rows),
        completed=sum(t.status == "completed" for t in rows),
        stopped=sum(t.status == "stopped" for t in rows),
        errors=sum(t.status == "error" for t in rows),
    )
    finished, total = sum(t.status != "unfinished" for t in rows), total_trials(spec)
    interrupted = finished < total  # Tune returns normally when Ctrl-C ends a search
    if not scored:
        if interrupted:
            raise SearchInterrupted(search_dir, finished, total)
        raise ConfigError("search", name, "no trial reported a metric; see the trial errors above")
    best = scored[0]
    write_text(join(search_dir, BEST_FILE), best_config_yaml(trial_base(base, spec), best, max_t))
    summary.update(
        best_trial=best.trial_id,
        best_value=best.best,
        best_params=best.params,
        best_checkpoint=best.checkpoint,
        best_config=join(search_dir, BEST_FILE),
    )
    echo(
        f"Best{' so far' if interrupted else ''}: trial {best.trial_id} {metric} {best.best:.4f}; config "
        f"{summary['best_config']}; checkpoint {best.checkpoint}"
    )
    if interrupted:
        raise SearchInterrupted(search_dir, finished, total)
    return summary


def load_search_file(path: str) -> tuple[dict, dict]:
    """A search YAML -> (training config mapping, search block)."""
    raw = read_yaml(path)
    search = raw.pop("search", None) or {}
    if not isinstance(search, dict):
        raise ConfigError("search", search, "expected a mapping")
    return raw, search


def space_from_cli(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, spec = item.partition("=")
        if not sep or not key:
            raise ConfigError("--search", item, "expected KEY=KIND:ARGS, e.g. lr=loguniform:1e-4:1e-1")
        out[key.strip()] = spec.strip()
    return out
