"""The driver side of a training run: connect to Ray, resolve the config once, build and fit the TorchTrainer.

Everything that must be the same on every worker (LR, epoch count, class list, input size, normalisation,
worker count) is worked out here, once, and travels to the workers in ``cfg.resolved``: a worker never
re-derives it from its own view of the cluster.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from raytrain_cls.core.config import Config, ConfigError, Resolved, dump_yaml
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.facts import RunFacts
from raytrain_cls.core.gcpause import hold_collector
from raytrain_cls.core.onednn import onednn_env
from raytrain_cls.core.optim import resolve_lr
from raytrain_cls.core.size_schedule import training_batch
from raytrain_cls.core.storage import is_uri, join, split, unwritable_reason, write_text
from raytrain_cls.run.capacity import (
    UNREAD_LIMITS_HINT,
    Capacity,
    connected_capacity,
    has,
    local_capacity,
    waiting_note,
)
from raytrain_cls.run.checkpointer import (
    DEFAULT_OUTPUT,
    RunDirCheckpoints,
    find_resume_target,
    init_checkpoint,
    remove_unregistered_checkpoints,
    resolve_output,
    run_config_file,
    run_started,
)
from raytrain_cls.run.console import BarRenderer, drop_ray_noise, start_live_display, use_bar
from raytrain_cls.run.elastic import create_requests, resize_callback
from raytrain_cls.run.local_ray import start_private_ray, started_private_ray
from raytrain_cls.run.report import CONFIG_FILE, RESULT_FILE, build_result, read_result, sizes_per_epoch, write_result
from raytrain_cls.run.startup import breakdown, describe, stamp
from raytrain_cls.run.worker_entry import train_loop_per_worker

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default). A checkpoint
# reported within that window before a crash is uploaded but never registered (../shared/DESIGN.md), and each
# start-up step waits for a poll. 0.5 s narrows the window and takes ~1.5 s off every fit (a trivial TorchTrainer
# on 2 workers: 10.4-11.3 s -> 8.8-9.1 s); the polls are cheap actor calls. A value the user set is kept.
HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


class TrainingError(RuntimeError):
    """The run started but failed; the message names the failing rank and the worker's error."""


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; its registered checkpoints stay, and --resume continues it."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        super().__init__(
            f"interrupted: the run stopped, its checkpoints are kept. Continue it with: "
            f"raytrain-cls train --resume {run_dir}"
        )

    def __reduce__(self):
        # Ray carries a worker's exception to the driver by pickling it, and the default pickling rebuilds it from
        # its message alone, which this __init__ does not take.
        return type(self), (self.run_dir,), self.__dict__


@dataclass
class RunPaths:
    output: str  # Ray's storage_path
    experiment: str  # Ray's RunConfig.name
    run_dir: str  # <output>/<experiment>


# ---- Ray connection ------------------------------------------------------------------------------------------
def connect(for_ray_train: bool = True) -> Capacity:
    """Attach to RAY_ADDRESS when set (a cluster, or the job's own cluster under `ray job submit`), else start a
    private local Ray (run/local_ray.py; ``for_ray_train`` False: for plain Ray tasks). Returns what the cluster
    can give a run: its total resources, or as much as its autoscaler can grow it to (capacity.py)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            join_cluster(address)
        else:
            start_private_ray(for_ray_train)
    drop_ray_noise()
    if started_private_ray():  # our own: no autoscaler to ask about
        return Capacity(ray.cluster_resources())
    return connected_capacity()


def join_cluster(address: str) -> None:
    """ray.init on the cluster RAY_ADDRESS names; a refused token is the user's to mend, said in one line."""
    import ray

    check_reachable(address)
    probe_gcs(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        if refused_token(e):
            raise token_refused(address) from None
        raise


def probe_gcs(address: str) -> bool:
    """Ask the cluster's GCS for its id once, as ray.init's first step does, and fail at once where ray.init would
    retry: a refused token (Ray's AuthenticationError, in milliseconds; ray.init retries it once a second for 20
    s), or a port that is open but no GCS's (no answer in Ray's 40 s; ray.init tries that 20 times). True: the
    GCS answered and took this process's token. Ray's GcsClient is not a public API: tests/e2e/test_cluster_jobs.py
    fails when this no longer refuses a wrong token at the first try; any other failure is left to ray.init, which
    reports it in its own words (False)."""
    if address in ("auto", "local") or split_address(address)[0]:
        return False  # Ray's to resolve, or a Ray Client server (ray://), which is no GCS
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        GcsClient(address=address)  # it fetches the cluster id as it connects
    except AuthenticationError:
        raise token_refused(address) from None
    except RpcError as e:
        if "Timed out" not in str(e):
            return False
        raise ConfigError(
            "environment RAY_ADDRESS",
            address,
            "something listens there but no Ray GCS answered: RAY_ADDRESS is a head node's GCS port "
            "(6379 for `ray start --head`, 6390 for cluster/local/start-head.sh)",
        ) from None
    except Exception:  # noqa: BLE001 - ray.init connects next and says what went wrong
        return False
    return True


def token_refused(address: str) -> ConfigError:
    return ConfigError(
        "environment RAY_ADDRESS",
        address,
        "the cluster refused this driver's token "
        "(missing or wrong): export RAY_AUTH_MODE=token and the cluster's token as "
        "RAY_AUTH_TOKEN (`ray get-auth-token` on its head) or in ~/.ray/auth_token",
    )


def refused_token(error: BaseException) -> bool:
    """Whether ray.init failed because the cluster's token authentication refused us (the cause, some levels down
    a ConnectionError, is Ray's AuthenticationError; its text says InvalidAuthToken)."""
    from ray.exceptions import AuthenticationError

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def split_address(address: str) -> tuple[str, str, str]:
    """A RAY_ADDRESS as (scheme or '', host, port text): 'ray://h:10001', 'h:6379', 'http://h:8265/'."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    host, _, port = rest.rstrip("/").rpartition(":")
    return scheme, host, port


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once, naming RAY_ADDRESS, where ray.init would retry an address nobody answers for minutes while
    logging GCS timeouts. 'auto'/'local' are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    scheme, host, port = split_address(address)
    key = "environment RAY_ADDRESS"
    if scheme in ("http", "https"):
        raise ConfigError(
            key,
            address,
            "that is a job server address, for `ray job submit --address`; a driver "
            "joins a cluster at its GCS address (HOST:6379), and `ray job submit` sets that for the "
            "jobs it runs",
        )
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConfigError(
            key,
            address,
            f"no Ray cluster answers there ({e}): start one (cluster/local/start-head.sh) "
            "or fix RAY_ADDRESS; unset it to train on a private local Ray",
        ) from None


# ---- resolution ----------------------------------------------------------------------------------------------
def default_cpu_layout(cfg: Config, node_cpus: list[float]) -> tuple[int, dict]:
    """(workers, resources per worker) for CPU training when the user chose neither --num-workers nor a CPU count:
    one worker per node, each with the CPUs of the smallest node as its threads (Ray sets OMP_NUM_THREADS, and so
    torch's thread count, to a worker's CPUs). On one host, one multi-threaded process trains faster than DDP
    between single-threaded ones (2 cores: 547-577 img/s against 415). With --loader ray a CPU per node is left
    for Ray Data. A cluster with no CPU node up yet (an autoscaler's) gets one 1-CPU worker."""
    nodes = [int(c) for c in node_cpus if c >= 1]
    if not nodes:
        return 1, {"CPU": 1}
    per_worker = min(nodes) - (1 if cfg.data.loader == "ray" else 0)
    return len(nodes), {"CPU": max(1, per_worker)}


def resolve_scaling(cfg: Config, cluster: dict) -> tuple[bool, int, dict]:
    """(use_gpu, num_workers, resources per worker) from the config and the cluster; fails early on what cannot be
    scheduled. An elastic run (MIN:MAX) is sized at MAX and needs only MIN to start: Ray grows it as it can."""
    s = cfg.scaling
    if s.local_mode:
        return resolve_local_scaling(cfg, cluster)
    span = s.worker_range()
    given = span[1] if span else s.num_workers  # the run's size at full strength
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)  # math.inf: an autoscaler without a limit
    use_gpu = s.use_gpu if s.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise ConfigError(
            "scaling.use_gpu",
            True,
            "the Ray cluster has no GPUs, and no autoscaler that can add "
            f"any: drop --use-gpu to train on CPUs ({UNREAD_LIMITS_HINT})",
        )
    if use_gpu and not given and math.isinf(gpus):
        raise ConfigError(
            "scaling.num_workers",
            None,
            "the cluster's autoscaler can add GPUs without limit: say "
            "how many GPU workers to train with (--num-workers N)",
        )
    per_worker = dict(s.resources_per_worker or {})
    if use_gpu:
        num_workers = given or int(gpus)
    elif given or "CPU" in per_worker:
        num_workers = given or 1
    else:
        node_cpus = getattr(cluster, "node_cpus", None)
        if node_cpus is None:  # a plain resource dict: its CPUs as one node, unless an autoscaler has no limit
            node_cpus = [cpus] if math.isfinite(cpus) else []
        num_workers, layout = default_cpu_layout(cfg, node_cpus)
        per_worker.update(layout)
    floor = span[0] if span else num_workers  # what the run needs to start
    shown = f"{span[0]}:{span[1]}" if span else num_workers
    needs = run_needs(per_worker, use_gpu, floor)
    need_gpu, need_cpu = needs["GPU"], needs["CPU"]
    if need_gpu > gpus:
        raise ConfigError(
            "scaling.num_workers",
            shown,
            f"needs {need_gpu:g} GPUs but {has(cluster, 'GPU')} ({UNREAD_LIMITS_HINT})",
        )
    if need_cpu > cpus:
        raise ConfigError(
            "scaling.num_workers",
            shown,
            f"needs {need_cpu:g} CPUs ({per_worker.get('CPU', 1):g} per worker) but "
            f"{has(cluster, 'CPU')}; lower --num-workers or resources_per_worker CPU "
            f"({UNREAD_LIMITS_HINT})",
        )
    if cfg.data.loader == "ray" and cpus - need_cpu < 1:
        raise ConfigError(
            "data.loader",
            "ray",
            f"Ray Data needs at least one CPU the training workers do not "
            f"reserve, or it waits forever: the workers take {need_cpu:g} of the cluster's {cpus:g} "
            "CPUs; lower resources_per_worker CPU (e.g. --resources-per-worker CPU=0.5) or "
            "--num-workers, or add a CPU node",
        )
    check_device_choices(cfg, use_gpu)
    return use_gpu, num_workers, per_worker


def resolve_local_scaling(cfg: Config, machine: dict) -> tuple[bool, int, dict]:
    """Local mode (--num-workers 0; ``machine``: capacity.local_capacity): one worker, this process, on its first
    GPU or on the machine's CPUs as threads (--resources-per-worker CPU=N: N of them)."""
    s = cfg.scaling
    gpus, cpus = machine.get("GPU", 0), machine.get("CPU", 1)
    use_gpu = s.use_gpu if s.use_gpu is not None else gpus > 0
    if use_gpu and not gpus:
        raise ConfigError(
            "scaling.use_gpu",
            True,
            "local mode (--num-workers 0) trains on this machine, where torch sees no CUDA device: drop "
            "--use-gpu, or give --num-workers N to train on a Ray cluster's GPUs",
        )
    per_worker = {"CPU": cpus, **(s.resources_per_worker or {})}
    if per_worker["CPU"] > cpus:
        raise ConfigError(
            "scaling.resources_per_worker.CPU",
            per_worker["CPU"],
            f"local mode (--num-workers 0) trains with this machine's CPUs as threads, and it has {cpus:g}",
        )
    if cfg.model.sync_bn:
        raise ConfigError(
            "model.sync_bn", True, "local mode (--num-workers 0) trains in one process: there is no BatchNorm to sync"
        )
    check_device_choices(cfg, use_gpu)
    return use_gpu, 1, per_worker


def check_device_choices(cfg: Config, use_gpu: bool) -> None:
    """What only GPUs can do, refused for a run on CPUs."""
    if cfg.model.sync_bn and not use_gpu:
        raise ConfigError(
            "model.sync_bn",
            True,
            "torch's SyncBatchNorm runs only on GPU workers; on CPU workers "
            "--dist-bn reduce (the default) averages BatchNorm statistics after each epoch instead",
        )
    if cfg.precision.model_dtype == "float16" and not use_gpu:
        raise ConfigError("precision.model_dtype", "float16", "float16 weights need GPUs; use bfloat16 on CPUs")
    if cfg.precision.amp and cfg.precision.amp_dtype == "float16" and not use_gpu:
        raise ConfigError("precision.amp_dtype", "float16", "float16 AMP needs GPUs; use --amp-dtype bfloat16 on CPUs")


def workers_phrase(r: Resolved) -> str:
    """'2 GPU workers', '1 CPU worker (2 CPUs)', '1 to 4 GPU workers': what the start line says the run trains
    on."""
    kind = "GPU" if r.use_gpu else "CPU"
    cpus = (r.resources_per_worker or {}).get("CPU")
    each = f" ({cpus:g} CPUs{' each' if r.num_workers > 1 else ''})" if cpus and not r.use_gpu and cpus != 1 else ""
    count = f"{r.min_workers} to {r.num_workers}" if r.min_workers else str(r.num_workers)
    return f"{count} {kind} worker{'s' if r.num_workers != 1 else ''}{each}"


def run_needs(per_worker: dict, use_gpu: bool, num_workers: int) -> dict:
    """GPUs and CPUs the run's workers reserve together."""
    return {
        "GPU": per_worker.get("GPU", 1 if use_gpu else 0) * num_workers,
        "CPU": per_worker.get("CPU", 1) * num_workers,
    }


def resolve(cfg: Config, cluster: dict, facts: Optional[RunFacts] = None) -> Config:
    """Fill cfg.resolved with every run-wide decision; raise ConfigError / DataError before any worker starts.
    ``facts``: what the checks before Ray found for this config (run/preflight.py), else they run here."""
    facts = facts or checked_facts(cfg)
    use_gpu, num_workers, per_worker = resolve_scaling(cfg, cluster)
    key, batch = training_batch(cfg)
    span = cfg.scaling.worker_range()
    if span and batch * num_workers * cfg.optim.grad_accum_steps > facts.train_samples:
        raise ConfigError(
            "data.batch_size",
            batch,
            f"x {num_workers} workers x {cfg.optim.grad_accum_steps} accumulation steps (the elastic run's global "
            f"batch) is more than the {facts.train_samples} training samples",
        )
    if batch * num_workers > facts.train_samples:
        raise ConfigError(
            f"data.{key}",
            getattr(cfg.data, key),
            f"x {num_workers} workers is more than the {facts.train_samples} training samples",
        )
    lr, lr_rule = resolve_lr(cfg, num_workers)
    num_epochs = facts.num_epochs
    if cfg.sched.start_epoch is not None and cfg.sched.start_epoch >= num_epochs:
        raise ConfigError(
            "sched.start_epoch",
            cfg.sched.start_epoch,
            f"the schedule runs {num_epochs} epochs (0..{num_epochs - 1}): nothing would be trained",
        )
    cfg.resolved = Resolved(
        use_gpu=use_gpu,
        num_workers=num_workers,
        min_workers=span[0] if span else None,
        resources_per_worker=per_worker or None,
        lr=lr,
        lr_rule=lr_rule,
        num_epochs=num_epochs,
        num_classes=facts.num_classes,
        classes=list(facts.classes),
        train_samples=facts.train_samples,
        val_samples=facts.val_samples,
        data_config=facts.data_config,
        **facts.extra,
    )
    return cfg


def checked_facts(cfg: Config) -> RunFacts:
    """The checks before Ray (timm, the data set), run for this config; its facts."""
    from raytrain_cls.run.preflight import preflight

    return preflight(cfg).facts


# ---- run directory -------------------------------------------------------------------------------------------
def default_experiment(cfg: Config) -> str:
    """timm's naming: date-time, model, image size."""
    size = cfg.model.img_size or (cfg.model.input_size[-1] if cfg.model.input_size else None)
    parts = [time.strftime("%Y%m%d-%H%M%S"), re.sub(r"[^\w.-]", "_", cfg.model.model)]
    if size:
        parts.append(str(size))
    return "-".join(parts)


def run_paths(cfg: Config) -> RunPaths:
    """Where the run goes. A new run never reuses a directory: Ray would silently resume whatever is there."""
    c = cfg.checkpoint
    output = resolve_output(cfg.checkpoint.output)
    if c.resume:
        kind, target = find_resume_target(c.resume, output)
        if kind == "run":  # continue it: same storage, same name, so Ray restores its checkpoint history
            parent, name = split(target)
            return RunPaths(parent, name, target)
    if c.experiment:
        run_dir = join(output, c.experiment)
        if run_started(run_dir):
            raise ConfigError(
                "checkpoint.experiment",
                c.experiment,
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                f"or pick another --experiment name",
            )
        return RunPaths(output, c.experiment, run_dir)
    base = default_experiment(cfg)
    name, n = base, 0
    while not is_uri(output) and Path(output, name).exists():
        n += 1
        name = f"{base}-{n}"
    return RunPaths(output, name, join(output, name))


# ---- fit -----------------------------------------------------------------------------------------------------
def build_trainer(cfg: Config, paths: RunPaths, extra_callbacks: Sequence = ()):
    import ray.train

    # Here, not at the top: a local-mode run (--num-workers 0) uses this module's checks and never Ray Train.
    from raytrain_cls.run.ray_trainer import RunTrainer
    from raytrain_cls.run.train_controller import SummaryCallback

    c, r = cfg.checkpoint, cfg.resolved
    datasets = {}
    if cfg.data.loader == "ray":
        from raytrain_cls.data.ray_data import DATASET_NAME, train_dataset  # timm's transforms: only for Ray Data

        datasets[DATASET_NAME] = train_dataset(cfg)
    return RunTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        datasets=datasets or None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(r.min_workers, r.num_workers) if r.min_workers else r.num_workers,
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_interval,
            use_gpu=r.use_gpu,
            resources_per_worker=r.resources_per_worker,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=paths.experiment,
            storage_path=paths.output,
            failure_config=ray.train.FailureConfig(
                max_failures=c.max_failures, max_preemption_failures=c.max_preemption_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=c.checkpoint_hist,
                checkpoint_score_attribute=f"eval_{c.eval_metric}",
                checkpoint_score_order=c.score_mode,
            ),
            callbacks=[SummaryCallback(paths.run_dir), *extra_callbacks],
            # Our rank-0 progress lines are the console output; Ray's per-report INFO lines would drown them.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_runtime_env(cfg, ray.get_runtime_context().runtime_env),
        ),
    )


GC_HOLD_HOOK = f"{hold_collector.__module__}.{hold_collector.__qualname__}"  # Ray imports it by name
# Where Ray 2.60 keeps a runtime env's set-up hook once it has taken it in (ray_constants; a unit test pins it).
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def worker_runtime_env(cfg: Config, job_env: Mapping) -> dict:
    """The train workers' processes: their environment, and the garbage collector held off from their start through
    their torch and timm imports (core/gcpause.py; the train function's first line gives it back). Not where the
    job (``job_env``: its runtime env) has a set-up hook of its own: a worker process runs one, and the user's wins."""
    env: dict = {"env_vars": worker_env(cfg)}
    if not (job_env.get("worker_process_setup_hook") or SETUP_HOOK_ENV in job_env.get("env_vars", {})):
        env["worker_process_setup_hook"] = GC_HOLD_HOOK
    return env


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment variables of the train workers, set before they import anything."""
    # Ray's print patch sends worker prints through a logger that also echoes them: each line twice.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.update(onednn_env(cfg.precision, cfg.resolved.use_gpu))  # CPU bf16: keep off AMX's NaN-leaking kernel
    return env


def wandb_run_id(cfg: Config, earlier: Optional[Resolved]) -> str:
    """One W&B run per training run: --wandb-resume-id, else the id a continued run already had, else a new one.
    Chosen on the driver, so a worker group restarted by Ray (or a --resume of the run) logs to the same run."""
    if cfg.run.wandb_resume_id:
        return cfg.run.wandb_resume_id
    return (earlier and earlier.wandb_id) or secrets.token_hex(4)


def explain_failure(err: BaseException) -> str:
    """One readable line per failed rank (the worker's own exception, not Ray's wrapper traceback)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        lines = []
        for rank, exc in sorted(failures.items()):
            text = str(exc).strip().splitlines()
            lines.append(f"rank {rank}: {text[-1] if text else type(exc).__name__}")
        return "; ".join(lines)
    cause = getattr(err, "controller_failure", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def train(cfg: Config, echo=print, console: Optional[TextIO] = None, stamps: Optional[dict] = None) -> dict:
    """Validate, resolve, fit. Returns the result.json payload. Raises ConfigError/DataError before any worker
    starts, TrainingError when the run itself fails. ``console``: the stream a live progress bar may use;
    ``stamps``: start-up stamps the caller already has (startup.py; the command's process start).
    --num-workers 0 (local mode) trains in this process (fit_here), any other count on Ray Train (fit_run)."""
    from raytrain_cls.run.preflight import check_start_weights, preflight

    cfg.validate()
    check_output(cfg)
    paths = run_paths(cfg)  # before Ray: a name clash is a config error, not a cluster job
    start_from = init_checkpoint(cfg)
    checked = preflight(cfg)  # before Ray: the model, its arguments and the data set
    check_start_weights(cfg, checked.architecture, start_from)
    stamps = dict(stamps or {})
    stamp(stamps, "driver")
    stamp(stamps, "checked")
    if start_from and run_config_file(paths.run_dir):  # continuing a run that died before its first checkpoint
        echo(
            f"{paths.run_dir} has no checkpoint of its own yet: it starts again from {start_from}, the checkpoint "
            f"it was started from"
        )
    fit = fit_here if cfg.scaling.local_mode else fit_run
    return fit(cfg, paths, start_from=start_from, echo=echo, console=console, stamps=stamps, facts=checked.facts)


def check_output(cfg: Config) -> None:
    """--output can hold the run: creatable and writable, not a file or inside one (a URI is its store's to judge)."""
    reason = unwritable_reason(resolve_output(cfg.checkpoint.output))
    if reason:
        raise ConfigError("checkpoint.output", cfg.checkpoint.output or DEFAULT_OUTPUT, f"cannot hold runs: {reason}")


def fit_run(
    cfg: Config,
    paths: RunPaths,
    start_from: Optional[str] = None,
    extra_callbacks: Sequence = (),
    echo=print,
    console: Optional[TextIO] = None,
    stamps: Optional[dict] = None,
    facts: Optional[RunFacts] = None,
) -> dict:
    """Resolve the config on this cluster, write config.yaml, fit, write result.json. Also a Tune trial's body."""
    import ray.train

    stamps = dict(stamps or {})
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)  # read by the controller fit() starts
    cluster = prepare_run(cfg, paths, stamps, start_from, facts, echo)
    r = cfg.resolved
    note = waiting_note(cluster, run_needs(r.resources_per_worker or {}, r.use_gpu, r.min_workers or r.num_workers))
    if note:
        echo(note)
    stop_display = None
    r.progress_board = None
    if use_bar(cfg.run.progress, console):
        r.progress_board, stop_display = start_live_display(r.num_epochs, console)
    resize_callbacks, requests = elastic_resize(cfg)  # the requests actor lives as long as this handle
    extra_callbacks = [*extra_callbacks, *resize_callbacks]
    stamp(stamps, "fit")
    r.startup = stamps  # rank 0 adds its own stamps and reports them all back
    try:
        result = build_trainer(cfg, paths, extra_callbacks).fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training failed: {explain_failure(e)} (run directory {paths.run_dir})") from e
    except (KeyboardInterrupt, SystemExit):
        # On SIGINT, TorchTrainer.fit's handler aborts the run and then sys.exit()s (its only exit), which would
        # end the command with status 1 and not a word; a SIGINT before that handler is a KeyboardInterrupt.
        # Only in the main thread: a Tune trial (another thread) is ended by Tune, its way.
        if threading.current_thread() is not threading.main_thread():
            raise
        raise RunInterrupted(paths.run_dir) from None
    finally:
        if stop_display is not None:
            stop_display()
    removed = remove_unregistered_checkpoints(paths.run_dir, result)
    if removed:
        echo(f"Removed {len(removed)} checkpoint folder(s) Ray never registered: {', '.join(removed)}")
    metric = f"eval_{cfg.checkpoint.eval_metric}"
    payload = build_result(result, metric, cfg.checkpoint.score_mode, paths.run_dir)
    payload["epochs"] = sizes_per_epoch(paths.run_dir)
    payload["startup"] = breakdown({**stamps, **(payload["last_metrics"].get("startup") or {})})
    payload["result_file"] = write_result(paths.run_dir, payload)
    echo(summary_table(payload, paths.run_dir))
    if payload["startup"]["phases"]:
        echo(describe(payload["startup"]))
    return payload


def fit_here(
    cfg: Config,
    paths: RunPaths,
    start_from: Optional[str] = None,
    echo=print,
    console: Optional[TextIO] = None,
    stamps: Optional[dict] = None,
    facts: Optional[RunFacts] = None,
) -> dict:
    """Local mode (--num-workers 0, as Ray Train's ScalingConfig(num_workers=0)): the run trains in this process,
    as its only worker, on this machine; no Ray cluster is started or joined, and Ray is not even imported. The run
    directory is a Ray Train run's (config.yaml, summary.csv, result.json, epoch-* checkpoints kept by Ray Train's
    rule), so `--resume`, `eval`, `export` and `plot` take it alike. What it gives up: Ray Train's restarts (a
    killed process is a killed run: `train --resume RUN` continues from its newest checkpoint) and more workers."""
    from raytrain_cls.run.in_process import train_here

    stamps = dict(stamps or {})
    if os.environ.get("RAY_ADDRESS"):
        echo("Local mode (--num-workers 0): training in this process; the cluster at RAY_ADDRESS is not used")
    cfg.checkpoint.preemption_check_interval = 0  # Ray Train's preemption notices: there is no Ray Train run
    prepare_run(cfg, paths, stamps, start_from, facts, echo)
    r = cfg.resolved
    r.progress_board, r.checkpoint_requests = None, None
    renderer = BarRenderer(console, r.num_epochs) if use_bar(cfg.run.progress, console) else None
    stamp(stamps, "local")
    r.startup = stamps
    try:
        train_here(cfg, RunDirCheckpoints(paths.run_dir, cfg), draw=renderer.handle if renderer else None)
    except KeyboardInterrupt:
        raise RunInterrupted(paths.run_dir) from None
    except UserError:
        raise
    except Exception as e:  # as a Ray Train run's failure reads: the cause's last line, the trace above it
        traceback.print_exc()
        raise TrainingError(f"training failed: {explain_failure(e)} (run directory {paths.run_dir})") from e
    finally:
        if renderer is not None:
            renderer.close()
    payload = read_result(paths.run_dir)  # RunDirCheckpoints rewrote it with every evaluated epoch
    if payload is None:  # nothing left to train (a finished run resumed), and no earlier result.json either
        raise TrainingError(f"the run trained no epoch and left no result (run directory {paths.run_dir})")
    payload["result_file"] = join(paths.run_dir, RESULT_FILE)
    echo(summary_table(payload, paths.run_dir))
    if payload["startup"]["phases"]:
        echo(describe(payload["startup"]))
    return payload


def prepare_run(
    cfg: Config,
    paths: RunPaths,
    stamps: dict,
    start_from: Optional[str] = None,
    facts: Optional[RunFacts] = None,
    echo=print,
) -> Capacity:
    """Connect, resolve the config on this cluster and write it into the run directory as config.yaml: what every
    run does before it trains, whoever then runs its loop (a Ray Train fit, or a Tune trial's own process)."""
    stamp(stamps, "driver")
    if cfg.scaling.local_mode:
        cluster = local_capacity()
    else:
        cluster = connect()
        stamp(stamps, "ray_ready")
    earlier = cfg.resolved  # a continued run's own decisions (its config.yaml), or None
    resolve(cfg, cluster, facts)
    stamp(stamps, "resolved")
    r = cfg.resolved
    r.output, r.experiment, r.run_dir = paths.output, paths.experiment, paths.run_dir
    if cfg.run.log_wandb:
        r.wandb_id = wandb_run_id(cfg, earlier)
    if start_from:
        r.init_checkpoint = start_from
    write_text(join(paths.run_dir, CONFIG_FILE), dump_yaml(cfg))
    echo(f"Run directory: {paths.run_dir}")
    echo(
        f"Training {cfg.model.model} on {cfg.data.dataset or 'folder'} ({r.train_samples} train / "
        f"{r.val_samples} val images, {r.num_classes} classes) with {workers_phrase(r)}"
        f"{' in this process (local mode)' if cfg.scaling.local_mode else ''} for {r.num_epochs} "
        f"epoch{'s' * (r.num_epochs != 1)}; lr {r.lr:.4g} ({r.lr_rule})"
    )
    return cluster


def elastic_resize(cfg: Config) -> tuple[list, Any]:
    """For an elastic run on a local (or mounted) run directory: the controller callback that makes a resize wait
    for a checkpoint, and the handle of the request actor it shares with the workers (None otherwise). On cloud
    storage a resize restarts from the latest checkpoint Ray registered (the restarted workers cannot list the
    bucket for a newer one)."""
    r = cfg.resolved
    r.checkpoint_requests = None
    if not r.min_workers or is_uri(r.run_dir) or not cfg.checkpoint.preemption_check_interval:
        return [], None
    requests, r.checkpoint_requests = create_requests()
    return [resize_callback(r.checkpoint_requests, r.run_dir)], requests


def summary_table(payload: dict, run_dir: str) -> str:
    """The run's last words: best metric and epoch, where the run and its best checkpoint are."""
    rows = []
    if payload["best_value"] is not None:
        rows.append((f"Best {payload['eval_metric']}", f"{payload['best_value']:.4f} at epoch {payload['best_epoch']}"))
    last = payload.get("last_metrics") or {}
    if "eval_top1" in last:
        rows.append(
            (
                "Last epoch",
                f"{last.get('epoch')}: top1 {last['eval_top1']:.2f}  top5 "
                f"{last.get('eval_top5', float('nan')):.2f}  eval_loss {last.get('eval_loss', float('nan')):.4f}",
            )
        )
    rows += [
        ("Run directory", run_dir),
        ("Best checkpoint", str(payload.get("best_checkpoint"))),
        ("Results", str(payload["result_file"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
