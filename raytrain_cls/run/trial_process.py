"""A Tune trial that trains in Tune's own trial process (`tune --in-process`), without a Ray Train run.

A trial that is a Ray Train run starts a Train controller and a worker process, each importing ray, torch and timm,
on top of the trial's own process: 13-23 s before its first step on a 2-core machine (docs/benchmarks.md), paid
again by every trial. A one-worker trial needs neither. Here the trial's process runs the per-worker loop itself
(in_process.train_here: worker.WorkerRun, the same code as a Ray Train worker's), its checkpoints kept by
checkpointer.RunDirCheckpoints,
and Tune hands the process to the next trial (reuse_actors), imports and all.

What such a trial leaves out, and the search refuses beforehand (tune.validate_search): more than one worker, an
elastic range, Ray Data input, cloud storage for the search directory. A trial whose process dies is Tune's to
start again (up to --max-failures times), and it continues from its run directory's newest checkpoint.
"""

from __future__ import annotations

import gc
import os
from typing import Optional

import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.facts import RunFacts
from raytrain_cls.run.checkpointer import RunDirCheckpoints
from raytrain_cls.run.driver import RunPaths, prepare_run
from raytrain_cls.run.in_process import train_here
from raytrain_cls.run.startup import stamp

# Tune reuses a process for the next trial only once the previous trial's training thread has ended, and waits
# TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) for it, else the search fails. A trial ASHA stopped waits in its
# epoch's report and ends there at once; one stopped mid-epoch ends at its next optimizer update
# (stop_requested), but it may be inside an evaluation pass that takes longer than 2 s.
THREAD_TIMEOUT_ENV, THREAD_TIMEOUT_S = "TUNE_FUNCTION_THREAD_TIMEOUT_S", "300"


def tune_stop_requested() -> bool:
    """Tune has ended this trial while its loop still trains (Ctrl-C, the search's end).

    A function trial reports synchronously: after each epoch's report its thread waits until Tune asks for the next
    epoch, so a trial ASHA stops is ended inside that report. One stopped mid-epoch would learn of it only at its
    next report, the end of the epoch, and the process (or the search's end) would wait for it; asked after every
    update instead, it gives its process up within one step. Ray's own flag, not a public API:
    tests/unit/test_trial_process.py fails when a Ray upgrade moves it."""
    from ray.train._internal.session import get_session

    session = get_session()
    return session is not None and session.stop_event.is_set()


def train_in_trial(cfg: Config, paths: RunPaths, stamps: dict, facts: Optional[RunFacts] = None) -> None:
    """One trial's run, here in the trial's process: resolve (with ``facts``, its search's, where they hold),
    config.yaml, the loop (result.json each epoch)."""
    from ray import tune

    os.environ.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT_S)  # read when Tune hands the process on
    cfg.checkpoint.preemption_check_interval = 0  # Ray Train's preemption notices: there is no Ray Train run
    prepare_run(cfg, paths, stamps, facts=facts, echo=lambda *a: None)
    r = cfg.resolved
    r.progress_board, r.checkpoint_requests = None, None
    stamp(stamps, "fit")
    r.startup = stamps
    if r.use_gpu:  # on the CPU the collector's own pace will do: a full collection costs ~0.3 s per trial
        free_previous_trial()
    train_here(cfg, RunDirCheckpoints(paths.run_dir, cfg, tune.report), tune_stop_requested)


def free_previous_trial() -> None:
    """Gives back the GPU memory the trial before this one in a reused process still holds once its loop ended: its
    model, optimizer and (--data-on-device) data set sit in reference cycles until the collector runs, and torch's
    CUDA cache keeps their memory from the other trials sharing the GPU."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


_trials_taken = 0  # by this process: from the second on, Tune has reused it


def trial_stamps(entered: float, imported_at: float) -> dict:
    """A trial's first start-up stamps: from the process's first import (``imported_at``) for the first trial a
    process takes; from the trial entering the process (``entered``) when Tune reused it, imports long done."""
    global _trials_taken
    _trials_taken += 1
    stamps: dict[str, Optional[float]] = {"in_process": entered}
    if _trials_taken == 1:
        stamps["process"] = imported_at
    return stamps
