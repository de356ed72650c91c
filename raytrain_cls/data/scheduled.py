"""timm's scheduled-resolution batches (--train-img-sizes) laid over this service's resumable sample order.

What timm's ScheduledBatchSampler does, kept (core/size_schedule.py holds the policy): in the sample-budget mode
(constant schedule, no --train-batches-per-epoch) a fixed multiset of (size, batch) steps that covers a worker's
share of the epoch is drawn once from the run seed and shuffled each epoch; the tail too small for any batch is
dropped, as timm's drop_last does. In the fixed-batch mode (--train-batches-per-epoch, or a progressive schedule,
which infers it from the average batch) every epoch has that many steps, each step's size drawn from the epoch's
weights; steps that want more samples than the epoch holds go round its order again, as timm's cycling does.

What is this service's own: the plan is a function of (seed, epoch) and, in the sample-budget mode, of the worker
count; step k takes the next ``world x batch_k`` positions of sampler.py's epoch order (a function of (seed, epoch)
only) and deals them round-robin, so every rank trains the same size and batch at the same step and the position
after any step is a global sample count a recovery checkpoint records. A resume on the same worker count continues
the plan exactly. On another worker count: the fixed-batch mode continues with the same remaining steps (their sizes
do not depend on the worker count); the sample-budget mode plans the rest of the epoch anew, so each remaining
sample is still trained once (a second interruption of that rest plans anew again from where it stopped: no sample
lost or repeated, but not the first rest plan's steps, whose start no checkpoint records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from raytrain_cls.core.size_schedule import SizeSchedule
from raytrain_cls.data.sampler import ResumableDistributedSampler, position_after_steps
from raytrain_cls.data.samples import sample_seed

_BUDGET = 0x51CE  # "copy" tags that keep the plan's random streams apart from the samples' augmentation
_FIXED = 0x51CF


@dataclass(frozen=True)
class SizedStep:
    choice: int  # index into the schedule's sizes
    batch: int  # per rank; the same on every rank
    start: int  # the step's first position in the epoch's global order (may pass its end: the order cycles)


def budget_steps(schedule: SizeSchedule, samples_per_rank: int, seed: int) -> list[tuple[int, int]]:
    """timm's sample-budget composition: (choice, batch) steps drawn with the base weights among the choices whose
    batch still fits, until less than the smallest batch is left (that tail is dropped)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, 0, 0, _BUDGET))
    weights = schedule.weights_for_epoch(0)
    steps, left = [], samples_per_rank
    while left >= schedule.min_batch:
        fits = [i for i in schedule.active if schedule.batch_sizes[i] <= left]
        choice = fits[int(torch.multinomial(weights[fits], 1, generator=gen))]
        steps.append((choice, schedule.batch_sizes[choice]))
        left -= schedule.batch_sizes[choice]
    return steps


def epoch_choices(schedule: SizeSchedule, epoch: int, num_batches: int, seed: int) -> list[int]:
    """The fixed-batch mode: each of the epoch's steps draws its size with the epoch's weights."""
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, 0, _FIXED))
    return torch.multinomial(schedule.weights_for_epoch(epoch), num_batches, replacement=True, generator=gen).tolist()


def _laid_out(choices: list[int], schedule: SizeSchedule, start: int, world: int) -> list[SizedStep]:
    steps, position = [], start
    for choice in choices:
        batch = schedule.batch_sizes[choice]
        steps.append(SizedStep(choice, batch, position))
        position += batch * world
    return steps


def _budget_plan(schedule: SizeSchedule, seed: int, epoch: int, world: int, start: int, end: int) -> list[SizedStep]:
    """Positions [start, end) as timm's sample-budget steps (what each rank can take without padding: no sample
    twice), in an order shuffled by (seed, epoch, start)."""
    canonical = budget_steps(schedule, max(0, end - start) // world, seed)
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, start, _BUDGET))
    order = torch.randperm(len(canonical), generator=gen).tolist()
    return _laid_out([canonical[i][0] for i in order], schedule, start, world)


def plan_epoch(
    schedule: SizeSchedule, seed: int, epoch: int, world: int, epoch_length: int, start: int = 0, done: int = 0
) -> tuple[list[SizedStep], int]:
    """(the steps left of the epoch, the index of the first of them in the epoch's plan) for an epoch of
    ``epoch_length`` positions that has trained ``done`` steps up to position ``start``."""
    fixed = schedule.fixed_batches(math.ceil(epoch_length / world))  # timm infers it from its sampler's length
    if fixed is not None:
        choices = epoch_choices(schedule, epoch, fixed, seed)[done:]
        return _laid_out(choices, schedule, start, world), min(done, fixed)
    full = _budget_plan(schedule, seed, epoch, world, 0, epoch_length)
    for k, step in enumerate(full):
        if step.start == start:  # a step boundary of the epoch's own plan: continue it exactly
            return full[k:], k
    # A position this worker count's plan never stops at (the checkpoint came from another worker count): the rest
    # of the epoch gets a budget plan of its own, shuffled by where it starts.
    rest = _budget_plan(schedule, seed, epoch, world, start, epoch_length)
    return rest, max(0, len(full) - len(rest))


class ScheduledBatchSampler(Sampler[list]):
    """This rank's batches of an epoch as lists of keys (index, epoch, copy, choice)."""

    def __init__(self, order: ResumableDistributedSampler, schedule: SizeSchedule):
        self.order, self.schedule = order, schedule
        self.steps, self.first_batch = self._plan(0)

    @property
    def consumed(self) -> int:
        return self.order.consumed

    def set_epoch(self, epoch: int, consumed: int = 0, batches: int = 0) -> None:
        """``batches``: the steps the epoch had trained when a recovery checkpoint recorded ``consumed``."""
        self.order.set_epoch(epoch, consumed)
        self.steps, self.first_batch = self._plan(batches)

    def _plan(self, done: int) -> tuple[list[SizedStep], int]:
        o = self.order
        return plan_epoch(self.schedule, o.seed, o.epoch, o.world_size, o.epoch_length, o.consumed, done)

    def choices(self) -> list[int]:
        """The size choice of each remaining step, in order."""
        return [step.choice for step in self.steps]

    def __iter__(self):
        o = self.order
        order, world, n = o.order(), o.world_size, o.epoch_length
        for step in self.steps:
            positions = (step.start + o.rank + world * torch.arange(step.batch)) % n  # past the end: cycle
            indices = order[positions // o.copies].tolist()
            yield [(i, o.epoch, c, step.choice) for i, c in zip(indices, (positions % o.copies).tolist())]

    def __len__(self) -> int:
        return len(self.steps)

    def position_after(self, steps_done: int) -> int:
        """Past the epoch's length where the steps went round its order again."""
        return position_after_steps(self.steps, steps_done, self.consumed, self.order.world_size)
