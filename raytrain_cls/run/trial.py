"""One Tune trial, in its own process: this trial's config, then a Ray Train run (`train`'s fit_run) or, with
`--in-process`, the per-worker loop in this very process (run/trial_process.py).

Tune pickles the trial function by reference and each trial's fresh process imports this module as it unpickles
it, so the module itself imports nothing heavy. The run side is imported by the first trial a process runs, with
the garbage collector held and what it made frozen afterwards (core/gcpause.py): a trial's process is Tune's
actor, ours alone. With the collector walking the growing heap that import took 3.4-4.3 s against 2.5-2.9 s held on
the 2-core machine (2026-12-06, docs/benchmarks.md), paid again by every trial that is a Ray Train run and by the
first trial of each `--in-process` process.

A trial that is a Ray Train run imports neither timm nor the training loop when its searched keys are ones the
checks before Ray never read (core/facts.py: lr, weight decay, mixup, smoothing, ...): it resolves with the facts
its search found for the base config (the data set's classes and sizes, the data config, the schedule's length),
and only its workers load timm. Any other trial runs the checks itself, as `train` does.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import raytrain_cls
from raytrain_cls.core.config import Config
from raytrain_cls.core.facts import RunFacts
from raytrain_cls.core.gcpause import collector_held
from raytrain_cls.core.storage import split
from raytrain_cls.run.report import read_result, trial_run_dir

# What a trial's process imports before its first trial: the driver, Ray Train with its torch trainer, and for a
# trial that trains here the loop (torch, timm); the checks (timm) only where the search's facts do not hold.
RAY_TRAIN_SIDE = ("raytrain_cls.run.driver", "raytrain_cls.run.ray_trainer")
IN_PROCESS_SIDE = ("raytrain_cls.run.driver", "raytrain_cls.run.trial_process")
CHECKS = "raytrain_cls.run.preflight"


def run_trial(
    params: dict, base: dict, search_dir: str, in_process: bool = False, base_facts: Optional[RunFacts] = None
) -> None:
    """One Tune trial: the base config with this trial's values, trained by Ray Train like `raytrain-cls train`,
    or with ``in_process`` by this very process. ``base_facts``: what the search's checks found for the base
    config (run/preflight.py). Tune's trainable (tune.build_tuner)."""
    from ray import tune

    cfg = Config.from_dict(base)
    facts = base_facts if base_facts and base_facts.hold_for(params, elastic=bool(cfg.scaling.worker_range())) else None
    import_run_side(IN_PROCESS_SIDE if in_process else RAY_TRAIN_SIDE + (() if facts else (CHECKS,)))
    from raytrain_cls.run.driver import RunPaths, fit_run

    entered = time.time()
    for key, value in params.items():
        cfg.set(key, value)
    # The optimizer's and teacher's names are looked up in timm's registries where they may differ from the
    # base config's, which the search looked up before its first trial.
    cfg.validate(registries=facts is None)
    # A stable name per trial: when a search is resumed, Ray Train resumes this trial from its own checkpoints.
    run_dir = trial_run_dir(search_dir, tune.get_context().get_trial_id())
    paths = RunPaths(*split(run_dir), run_dir)
    done = finished_run(paths.run_dir, cfg, facts)
    if done is not None:
        # Finished before the search driver died, but Tune had not yet recorded it: hand Tune the final
        # result instead of starting workers for nothing.
        tune.report(dict(done["last_metrics"], checkpoint_path=done["latest_checkpoint"]))
        return
    if in_process:
        from raytrain_cls.run.trial_process import train_in_trial, trial_stamps

        train_in_trial(cfg, paths, trial_stamps(entered, raytrain_cls.IMPORTED_AT), facts)
        return
    # The trial's start-up counts from this process's first import of raytrain_cls (Tune unpickling this function
    # in the trial's fresh actor process): its imports (Ray Train, torch, the driver) are paid again by every trial.
    stamps = {"process": raytrain_cls.IMPORTED_AT}
    fit_run(cfg, paths, extra_callbacks=[epoch_report_callback()], echo=lambda *a: None, stamps=stamps, facts=facts)


def import_run_side(modules: tuple[str, ...]) -> None:
    """The run side's modules, imported by the process's first trial with the collector held, and what they made
    frozen; a process that has them (reused by Tune, or the tests') is left as it is."""
    missing = [name for name in modules if name not in sys.modules]
    if missing:
        with collector_held(freeze=True):
            for name in missing:
                __import__(name)


def finished_run(run_dir: str, cfg: Config, facts: Optional[RunFacts] = None) -> Optional[dict]:
    """A trial run's result.json when the run trained all its epochs (``facts``: the config's, when known),
    else None."""
    result = read_result(run_dir)
    if result is None:
        return None
    if facts is None:
        from raytrain_cls.core.optim import resolve_num_epochs

        num_epochs = resolve_num_epochs(cfg)
    else:
        num_epochs = facts.num_epochs
    last = result.get("last_metrics") or {}
    return result if last.get("epoch") == num_epochs - 1 else None


def epoch_report_callback():
    """Tune's Train->Tune bridge, minus our mid-epoch recovery reports: one Tune iteration = one epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("recovery"):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochReportCallback()
