"""A Tune trial that trains in Tune's own trial process (`tune --in-process`), without a Ray Train run.

A trial that is a Ray Train run starts a Train controller and a worker process, each importing ray, torch and timm,
on top of the trial's own process: 13-23 s before its first step on a 2-core machine (docs/benchmarks.md), paid
again by every trial. A one-worker trial needs neither. Here the trial's process runs the per-worker loop itself
(worker.WorkerRun, the same code as a Ray Train worker's), its checkpoints kept by checkpointer.TrialCheckpoints,
and Tune hands the process to the next trial (reuse_actors), imports and all.

What such a trial leaves out, and the search refuses beforehand (tune.validate_search): more than one worker, an
elastic range, Ray Data input, cloud storage for the search directory. A trial whose process dies is Tune's to
start again (up to --max-failures times), and it continues from its run directory's newest checkpoint.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Optional

import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.onednn import onednn_env
from raytrain_cls.run.checkpointer import TrialCheckpoints
from raytrain_cls.run.driver import RunPaths, prepare_run
from raytrain_cls.run.startup import stamp
from raytrain_cls.run.worker import WorkerContext, WorkerRun

# Tune reuses a process for the next trial only once the previous trial's training thread has ended, and waits
# TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) for it, else the search fails. A trial ASHA stopped waits in its
# epoch's report and ends there at once; one stopped mid-epoch ends at its next optimizer update
# (stop_requested), but it may be inside an evaluation pass that takes longer than 2 s.
THREAD_TIMEOUT_ENV, THREAD_TIMEOUT_S = "TUNE_FUNCTION_THREAD_TIMEOUT_S", "300"


def trial_device(use_gpu: bool) -> torch.device:
    """The trial's GPU (Ray makes the one whose share it granted the process's cuda:0), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # Ray granted a GPU share, yet this process's torch sees no CUDA device
        raise UserError(
            "this trial was given a GPU share (--gpus-per-worker) but torch sees no CUDA device on its node "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch.device("cuda:0")


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


def train_in_trial(cfg: Config, paths: RunPaths, stamps: dict) -> None:
    """One trial's run, here in the trial's process: resolve, config.yaml, the loop (result.json each epoch)."""
    from ray import tune

    os.environ.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT_S)  # read when Tune hands the process on
    # What a Ray Train worker gets in its environment (driver.worker_env), set before this process's first oneDNN
    # call: none ran in it yet, as the trial's checks build the model on the meta device (a reused process keeps
    # what its first trial set: oneDNN reads it once).
    os.environ.update(onednn_env(cfg.precision, use_gpu=bool(cfg.scaling.use_gpu)))
    cfg.checkpoint.preemption_check_interval = 0  # Ray Train's preemption notices: there is no Ray Train run
    prepare_run(cfg, paths, stamps, echo=lambda *a: None)
    r = cfg.resolved
    r.progress_board, r.checkpoint_requests = None, None
    cpus = (r.resources_per_worker or {}).get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # a reused process keeps the previous trial's count otherwise
    stamp(stamps, "fit")
    r.startup = stamps
    if r.use_gpu:  # on the CPU the collector's own pace will do: a full collection costs ~0.3 s per trial
        free_previous_trial()
    keeper = TrialCheckpoints(paths.run_dir, cfg, tune.report)
    where = WorkerContext(0, 1, trial_device(r.use_gpu), keeper, tune_stop_requested)
    WorkerRun(cfg.to_dict(), time.time(), where).run()  # result.json is written with each epoch's report


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
