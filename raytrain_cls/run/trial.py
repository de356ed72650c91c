"""One Tune trial, in its own process: this trial's config, then a Ray Train run (`train`'s fit_run) or, with
`--in-process`, the per-worker loop in this very process (run/trial_process.py).

Tune pickles the trial function by reference and each trial's fresh process imports this module as it unpickles
it, so the module itself imports nothing heavy. The run side (the driver, torch, timm) is imported by the first
trial a process runs, with the garbage collector held and what it made frozen afterwards (core/gcpause.py): a
trial's process is Tune's actor, ours alone. With the collector walking the growing heap that import took 3.4-4.3 s
against 2.5-2.9 s held on the 2-core machine (2026-12-06, docs/benchmarks.md), paid again by every trial that is a
Ray Train run and by the first trial of each `--in-process` process.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import raytrain_cls
from raytrain_cls.core.config import Config
from raytrain_cls.core.gcpause import collector_held
from raytrain_cls.core.storage import split
from raytrain_cls.run.report import read_result, trial_run_dir

RUN_SIDE = "raytrain_cls.run.driver"  # torch, timm and Ray Train, through the driver


def run_trial(params: dict, base: dict, search_dir: str, in_process: bool = False) -> None:
    """One Tune trial: the base config with this trial's values, trained by Ray Train like `raytrain-cls train`,
    or with ``in_process`` by this very process. Tune's trainable (tune.build_tuner)."""
    from ray import tune

    import_run_side()
    from raytrain_cls.run.driver import RunPaths, fit_run

    entered = time.time()
    cfg = Config.from_dict(base)
    for key, value in params.items():
        cfg.set(key, value)
    cfg.validate()
    # A stable name per trial: when a search is resumed, Ray Train resumes this trial from its own checkpoints.
    run_dir = trial_run_dir(search_dir, tune.get_context().get_trial_id())
    paths = RunPaths(*split(run_dir), run_dir)
    done = finished_run(paths.run_dir, cfg)
    if done is not None:
        # Finished before the search driver died, but Tune had not yet recorded it: hand Tune the final
        # result instead of starting workers for nothing.
        tune.report(dict(done["last_metrics"], checkpoint_path=done["latest_checkpoint"]))
        return
    if in_process:
        from raytrain_cls.run.trial_process import train_in_trial, trial_stamps

        train_in_trial(cfg, paths, trial_stamps(entered, raytrain_cls.IMPORTED_AT))
        return
    # The trial's start-up counts from this process's first import of raytrain_cls (Tune unpickling this function
    # in the trial's fresh actor process): its imports (torch, timm, the driver) are paid again by every trial.
    stamps = {"process": raytrain_cls.IMPORTED_AT}
    fit_run(cfg, paths, extra_callbacks=[epoch_report_callback()], echo=lambda *a: None, stamps=stamps)


def import_run_side() -> None:
    """The driver, torch, timm and Ray Train, imported by the process's first trial with the collector held, and
    what they made frozen; a process that has them (reused by Tune, or the tests') is left as it is."""
    if RUN_SIDE not in sys.modules:
        with collector_held(freeze=True):
            __import__(RUN_SIDE)


def finished_run(run_dir: str, cfg: Config) -> Optional[dict]:
    """A trial run's result.json when the run trained all its epochs, else None."""
    from raytrain_cls.core.optim import resolve_num_epochs

    result = read_result(run_dir)
    if result is None:
        return None
    last = result.get("last_metrics") or {}
    return result if last.get("epoch") == resolve_num_epochs(cfg) - 1 else None


def epoch_report_callback():
    """Tune's Train->Tune bridge, minus our mid-epoch recovery reports: one Tune iteration = one epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("recovery"):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochReportCallback()
