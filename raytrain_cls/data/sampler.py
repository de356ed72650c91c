"""Distributed samplers whose order depends only on (seed, epoch), never on the number of workers.

Training: one global permutation per epoch; the samples not yet consumed are dealt round-robin to the ranks, so
the union of the ranks' k-th batches is one contiguous block of the global order. A position in that order
(``consumed``) is therefore meaningful for any worker count, which is what makes a resume exact.
With timm's --aug-repeats r, each sample of the order is repeated r times in a row before the dealing, so its
copies land on r different ranks (or, with fewer ranks, in one batch); the copy number (0..r-1) travels with the
index so that each copy is augmented differently.
Validation: rank r takes samples r, r + world, ... with no padding, so summed counts are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch.utils.data import Sampler

PASSES_MAX = 1000  # --epoch-repeats is capped there, so (epoch, pass) keys never collide


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=_generator(seed, epoch))


def block_order(block_sizes: Sequence[int], seed: int, epoch: int, window: int) -> torch.Tensor:
    """A two-level shuffle for sharded data: the blocks' (shards') order is shuffled, then the samples within
    each run of ``window`` consecutive blocks. A reader then needs only a window's blocks at a time, while the
    order still depends on nothing but (seed, epoch). ``window`` 0 (or >= the block count) = a full shuffle."""
    total = int(sum(block_sizes))
    if window <= 0 or window >= len(block_sizes):
        return epoch_order(total, seed, epoch)
    gen = _generator(seed, epoch)
    starts = [0]
    for size in block_sizes:
        starts.append(starts[-1] + int(size))
    blocks = torch.randperm(len(block_sizes), generator=gen).tolist()
    parts = []
    for w in range(0, len(blocks), window):
        ids = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in blocks[w : w + window]])
        parts.append(ids[torch.randperm(len(ids), generator=gen)])
    return torch.cat(parts)


def position_after_steps(steps: Sequence, steps_done: int, consumed: int, world_size: int) -> int:
    """For batch plans of steps (each with ``start``, its first position, and ``batch`` per rank): the epoch's
    global position once ``steps_done`` more of them are trained, all ranks alike."""
    if steps_done <= 0 or not steps:
        return consumed
    last = steps[min(steps_done, len(steps)) - 1]
    return last.start + last.batch * world_size


class ResumableDistributedSampler(Sampler[int]):
    """This rank's share of the epoch's global order, starting after the first ``consumed`` samples.

    The remainder is padded with samples from the start of the epoch's order so every rank gets the same count
    (DDP ranks must take the same number of steps), as torch's DistributedSampler does.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        blocks: Optional[Sequence[int]] = None,
        window: int = 0,
        repeats: float = 0.0,
        aug_repeats: int = 0,
        whole_batches: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if blocks is not None and sum(blocks) != num_samples:
            raise ValueError(f"block sizes add up to {sum(blocks)}, not {num_samples}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.blocks, self.window = (list(blocks) if blocks is not None else None), window
        # timm's --epoch-repeats: an epoch is this many passes, each with its own shuffle (0 = one pass)
        self.epoch_length = int(round(num_samples * repeats)) if repeats > 0 else num_samples
        if whole_batches > 0:  # elastic training: only whole global batches, the same at every worker count
            self.epoch_length -= self.epoch_length % whole_batches
        # timm's --aug-repeats: the epoch keeps its length but is made of 1/r as many samples, each r times
        self.copies = max(1, int(aug_repeats))
        self.passes = max(1, math.ceil(self.epoch_length / (num_samples * self.copies))) if num_samples else 1
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0, batches: int = 0) -> None:
        """``batches`` (done so far) is not needed here: the position says it all."""
        self.epoch, self.consumed = epoch, consumed

    def _pass_order(self, p: int) -> torch.Tensor:
        # Pass p of epoch e shuffles like "epoch e * PASSES_MAX + p": one pass per epoch keeps the plain order.
        key = self.epoch if self.passes == 1 else self.epoch * PASSES_MAX + p
        if self.shuffle and self.blocks is not None:
            return block_order(self.blocks, self.seed, key, self.window)
        return epoch_order(self.num_samples, self.seed, key, self.shuffle)

    def _positions(self) -> torch.Tensor:
        """This rank's positions in the epoch's global order (after ``consumed``, padded to equal shares)."""
        positions = torch.arange(self.consumed, self.epoch_length)
        pad = (-len(positions)) % self.world_size
        if pad:
            positions = torch.cat([positions, torch.arange(pad)])
        return positions[self.rank :: self.world_size]

    def order(self) -> torch.Tensor:
        """The epoch's global order of sample indices (every pass of --epoch-repeats, one after the other)."""
        return torch.cat([self._pass_order(p) for p in range(self.passes)])

    def tagged(self) -> list[tuple[int, int]]:
        """(sample index, copy number) for this rank; the copy number is 0 unless --aug-repeats is on."""
        order = self.order()
        positions = self._positions()
        indices = order[positions // self.copies].tolist()
        return list(zip(indices, (positions % self.copies).tolist()))

    def __iter__(self):
        return (index for index, _ in self.tagged())

    def __len__(self) -> int:
        return -(-(self.epoch_length - self.consumed) // self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}


class ShardSampler(Sampler[int]):
    """Rank r's validation samples: r, r + world, ...; no padding, no duplicates."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
