"""timm's scheduled-resolution policy (--train-img-sizes and its options), as pure functions of the config.

Each training batch takes one "choice": a square image size with its own batch size. The choices are drawn with
base weights (--train-size-probs); a ``progressive`` schedule moves a Gaussian window (--train-size-schedule-spread,
in choice-index units) from the first choice to the last over --epochs, mixed with a share of uniform exploration
over the allowed choices (--train-size-random-mix). The policy-average batch size is what timm scales the LR and
the per-batch loss (--variable-batch-loss-scale) by.

This module knows nothing of samples or workers: data/scheduled.py lays the batches over the sample order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from raytrain_cls.core.config import Config


@dataclass(frozen=True)
class SizeSchedule:
    img_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # per worker, one per image size
    weights: tuple[float, ...]  # the base weights, normalised; a 0 never draws that choice
    progressive: bool
    epochs: int  # a progressive schedule reaches the last choice at epoch epochs - 1
    spread: float
    random_mix: float
    batches_per_epoch: Optional[int]  # --train-batches-per-epoch; None: inferred (progressive) or a sample budget

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.weights) if w > 0)

    def weights_for_epoch(self, epoch: int) -> torch.Tensor:
        """The choices' probabilities in ``epoch`` (0-based): the base weights, or the progressive window there."""
        base = torch.tensor(self.weights, dtype=torch.float64)
        if not self.progressive:
            return base
        progress = 1.0 if self.epochs == 1 else min(max(epoch / (self.epochs - 1), 0.0), 1.0)
        centre = progress * (len(self.weights) - 1)
        positions = torch.arange(len(self.weights), dtype=torch.float64)
        if self.spread == 0:
            distance = (positions - centre).abs()
            window = (distance == distance.min()).to(torch.float64)
        else:
            window = torch.exp(-0.5 * ((positions - centre) / self.spread) ** 2)
        window = window * base
        if window.sum() <= 0:  # the window sits on zero-weight choices only: the nearest allowed one
            window = torch.zeros_like(base)
            window[min(self.active, key=lambda i: abs(i - centre))] = 1.0
        window = window / window.sum()
        if self.random_mix:
            uniform = (base > 0).to(torch.float64)
            window = (1.0 - self.random_mix) * window + self.random_mix * uniform / uniform.sum()
        return window / window.sum()

    @property
    def average_batch(self) -> float:
        """The policy-average per-worker batch: over the progressive epochs, or of the constant weights."""
        sizes = torch.tensor(self.batch_sizes, dtype=torch.float64)
        epochs = range(self.epochs) if self.progressive else range(1)
        # summed as timm sums it: the inferred batch count below must be timm's to the last bit
        return float(torch.stack([torch.dot(self.weights_for_epoch(e), sizes) for e in epochs]).mean())

    @property
    def min_batch(self) -> int:
        return min(self.batch_sizes[i] for i in self.active)

    def fixed_batches(self, samples_per_worker: int) -> Optional[int]:
        """The number of batches every epoch has, or None for a sample budget (constant schedule, no
        --train-batches-per-epoch: the epoch's samples are covered once by a fixed mix of batches)."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        if not self.progressive:
            return None
        # timm infers it, dropping the tail; with one batch size by integer division (no float rounding)
        if len(set(self.batch_sizes)) == 1:
            return max(1, samples_per_worker // self.batch_sizes[0])
        return max(1, int(samples_per_worker / self.average_batch))


def size_schedule(cfg: Config) -> Optional[SizeSchedule]:
    """The run's schedule, or None without --train-img-sizes."""
    d = cfg.data
    if not d.train_img_sizes:
        return None
    n = len(d.train_img_sizes)
    probs = d.train_size_probs or [1.0] * n
    total = float(sum(probs))
    return SizeSchedule(
        img_sizes=tuple(d.train_img_sizes),
        batch_sizes=tuple(d.train_batch_sizes or [d.batch_size] * n),
        weights=tuple(p / total for p in probs),
        progressive=d.train_size_schedule == "progressive",
        epochs=cfg.sched.epochs,
        spread=d.train_size_schedule_spread,
        random_mix=d.train_size_random_mix,
        batches_per_epoch=d.train_batches_per_epoch,
    )


def training_batch(cfg: Config) -> tuple[str, int]:
    """(the key, the smallest per-worker training batch): --batch-size, or of the scheduled sizes' batches."""
    schedule = size_schedule(cfg)
    if schedule is None:
        return "batch_size", cfg.data.batch_size
    return ("train_batch_sizes" if cfg.data.train_batch_sizes else "batch_size"), schedule.min_batch


def reference_batch(cfg: Config) -> float:
    """The per-worker batch the LR and the loss scale refer to: --batch-size, or the policy average."""
    schedule = size_schedule(cfg)
    return schedule.average_batch if schedule is not None else float(cfg.data.batch_size)


def batch_loss_scale(mode: str, reference: float):
    """timm's --variable-batch-loss-scale / --naflex-loss-scale: a batch's loss times (its size / the reference
    batch), or the square root of that, or 1."""
    if mode == "none":
        return lambda n: 1.0
    if mode == "sqrt":
        return lambda n: math.sqrt(n / reference)
    return lambda n: n / reference
