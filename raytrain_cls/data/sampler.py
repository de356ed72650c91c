"""Distributed samplers whose order depends only on (seed, epoch), never on the number of workers.

Training: one global permutation per epoch; the samples not yet consumed are dealt round-robin to the ranks, so
the union of the ranks' k-th batches is one contiguous block of the global order. A position in that order
(``consumed``) is therefore meaningful for any worker count, which is what makes a resume exact.
Validation: rank r takes samples r, r + world, ... with no padding, so summed counts are exact.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class ResumableDistributedSampler(Sampler[int]):
    """This rank's share of the epoch's global order, starting after the first ``consumed`` samples.

    The remainder is padded with samples from the start of the epoch's order so every rank gets the same count
    (DDP ranks must take the same number of steps), as torch's DistributedSampler does.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def _indices(self) -> torch.Tensor:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        remaining = order[self.consumed:]
        pad = (-len(remaining)) % self.world_size
        if pad:
            remaining = torch.cat([remaining, order[:pad]])
        return remaining[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return -(-(self.num_samples - self.consumed) // self.world_size)

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
