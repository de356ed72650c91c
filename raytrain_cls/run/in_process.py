"""A run's only worker, trained in the process that asked for the run instead of in a Ray Train worker: a Tune
trial's own process (`tune --in-process`, trial_process.py) or the command's (local mode, `train --num-workers 0`,
driver.fit_here).

The loop is the same worker.WorkerRun a Ray Train worker runs; what differs is answered by its WorkerContext: rank
0 of 1, this process's device, checkpoints kept in the run directory (checkpointer.RunDirCheckpoints), and the
caller's own stop check and console. Nothing here imports ray.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.onednn import onednn_env
from raytrain_cls.run.checkpointer import CheckpointKeeper
from raytrain_cls.run.worker import WorkerContext, WorkerRun


def process_device(use_gpu: bool) -> torch.device:
    """This process's GPU (a Ray trial's GPU share is its cuda:0; a local run takes the first), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # given a GPU (share), yet this process's torch sees no CUDA device
        raise UserError(
            "this run was given a GPU but torch sees no CUDA device on its node "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch.device("cuda:0")


def train_here(
    cfg: Config,
    keeper: CheckpointKeeper,
    stop_requested: Callable[[], bool] = lambda: False,
    draw: Optional[Callable[[str, Any], None]] = None,
) -> dict:
    """Trains the resolved run ``cfg`` in this process as its only worker; returns the last epoch's metrics.
    ``draw``: where rank 0's console events go when a live bar is drawn in this process (else plain lines)."""
    r = cfg.resolved
    # What a Ray Train worker gets in its environment (driver.worker_env), set before this process's first oneDNN
    # call: none ran in it yet, as the checks before build the model on the meta device (a reused Tune process
    # keeps what its first trial set: oneDNN reads it once).
    os.environ.update(onednn_env(cfg.precision, use_gpu=r.use_gpu))
    cpus = (r.resources_per_worker or {}).get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # as Ray sets a worker's; a reused process keeps the last count else
    where = WorkerContext(0, 1, process_device(r.use_gpu), keeper, stop_requested, draw)
    return WorkerRun(cfg.to_dict(), time.time(), where).run()
