"""Elastic training's arithmetic (`--num-workers MIN:MAX`), with no Ray in it.

One rule: the optimisation does not depend on how many workers Ray gives the run. The global batch is resolved
once, at the run's largest size (``--batch-size`` x MAX workers x ``--grad-accum-steps``), and with it the LR; at
any other worker count the same global batch is made of more accumulation steps, and where that cannot be exact,
of smaller per-worker micro-batches (``split_global_batch``: never larger ones, so what fits in memory at full size
still fits). An epoch is a whole number of global batches, so every optimizer update of every size trains exactly
the next ``global_batch`` samples of the epoch's worker-count-independent order, and the LR schedule, which counts
updates, is the same curve whatever happens to the cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from raytrain_cls.core.config import Config, ConfigError


@dataclass(frozen=True)
class BatchSplit:
    """How ``workers`` ranks make one optimizer update: each trains ``accum_steps`` micro-batches of
    ``batch_size`` samples."""

    workers: int
    batch_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size * self.accum_steps


def split_global_batch(global_batch: int, batch_size: int, workers: int) -> Optional[BatchSplit]:
    """The split of ``global_batch`` over ``workers`` ranks with the fewest accumulation steps whose micro-batch is
    no larger than ``batch_size`` and divides the rank's share exactly; None when the share itself is not whole."""
    if workers < 1 or global_batch % workers:
        return None
    share = global_batch // workers
    accum = math.ceil(share / batch_size)
    while share % accum:
        accum += 1
    return BatchSplit(workers, share // accum, accum)


def global_batch_of(cfg: Config) -> int:
    """An elastic run's global batch: --batch-size x MAX workers x --grad-accum-steps."""
    return cfg.data.batch_size * cfg.scaling.worker_range()[1] * cfg.optim.grad_accum_steps


def split_for(cfg: Config, workers: int) -> BatchSplit:
    """What a worker group of ``workers`` ranks trains with: for an elastic run the split that keeps the global
    batch (checked at start for every size in the range), else the configured batch and accumulation."""
    if cfg.scaling.worker_range() is None:
        return BatchSplit(workers, cfg.data.batch_size, cfg.optim.grad_accum_steps)
    split = split_global_batch(global_batch_of(cfg), cfg.data.batch_size, workers)
    if split is None:  # check_elastic_range refused this before the run started
        raise ConfigError("scaling.num_workers", cfg.scaling.num_workers, f"cannot keep the global batch on {workers}")
    return split


def check_elastic_range(cfg: Config, even_batches: bool = False) -> dict[int, BatchSplit]:
    """Every worker count in MIN..MAX keeps the global batch exactly (and, with ``even_batches``, for batch or
    pair mixup, with even micro-batches); else a ConfigError that names the counts that fail and settings that
    would work. Returns the split of each count."""
    low, high = cfg.scaling.worker_range()
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum_steps

    def splits_of(b: int, lo: int, hi: int) -> dict[int, Optional[BatchSplit]]:
        total = b * hi * accum
        found = {n: split_global_batch(total, b, n) for n in range(lo, hi + 1)}
        return {n: s if s and not (even_batches and s.batch_size % 2) else None for n, s in found.items()}

    splits = splits_of(batch, low, high)
    failing = [n for n, s in splits.items() if s is None]
    if not failing:
        return splits
    total = global_batch_of(cfg)
    why = "an odd micro-batch, which batch or pair mixup cannot take" if even_batches else "no whole share per worker"
    batches = [b for b in range(max(1, batch // 2), batch * 2 + 1) if None not in splits_of(b, low, high).values()]
    nearest = sorted(batches, key=lambda b: (abs(b - batch), b))[:3]
    ranges = [f"{lo}:{high}" for lo in range(low + 1, high) if None not in splits_of(batch, lo, high).values()]
    options = []
    if nearest:
        options.append(f"--batch-size {' or '.join(map(str, sorted(nearest)))}")
    if ranges:
        options.append(f"--num-workers {ranges[0]}")
    raise ConfigError(
        "scaling.num_workers",
        f"{low}:{high}",
        f"the global batch {total} ({batch} x {high} workers x {accum} accumulation steps) cannot be kept on "
        f"{', '.join(map(str, failing))} worker(s) ({why})" + (f": use {' or '.join(options)}" if options else ""),
    )
