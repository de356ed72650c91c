"""timm's NaFlex loader (--naflex-loader) on this service's resumable, worker-count-independent sample order.

What timm's NaFlexMapDatasetWrapper does, kept: an epoch is a fixed multiset of steps (sequence length, batch
size), drawn once from the run seed and shuffled each epoch; every image of a step is resized, aspect kept, to at
most that many patches, patchified and padded to the step's length; a step's batch holds about
``--batch-size x max(--naflex-train-seq-lens)`` tokens (rounded down to a multiple of 8, as timm does); mixup and
cutmix mix neighbouring images of a batch (timm's NaFlexMixup); the loss is scaled by the batch's size.

What is this service's own: the epoch's sample order is the one sampler.py gives (a function of (seed, epoch)
only); step k takes the next ``world x batch_k`` positions of that order and deals them round-robin to the ranks.
So every rank has the same batch size at every step (DDP stays in lock-step and timm's cross-rank loss
correction is always 1), the position after any step is a global sample count that a recovery checkpoint can
record, and a resume on the same worker count continues the exact plan. On another worker count the rest of the
epoch gets a plan of its own that still trains each remaining sample once. Augmentation is seeded per (seed,
epoch, sample), mixup per (seed, epoch, batch position): no dependence on loader processes or Ray workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Sampler

from raytrain_cls.core.loss import mixup_active, mixup_kwargs
from raytrain_cls.data.sampler import ResumableDistributedSampler, position_after_steps
from raytrain_cls.data.samples import BadSample, read_sample, sample_seed, seeded, split_bad
from raytrain_cls.data.sources import ImageDataset
from raytrain_cls.data.transforms import transform_kwargs

BATCH_DIVISOR = 8  # timm rounds NaFlex batch sizes down to a multiple of 8 (never below 1)
_PLAN = 0x5EED  # "copy" tags that keep the plan's and mixup's random streams apart from the samples'
_MIXUP = 0x313C


def step_batch_size(tokens_per_batch: int, seq_len: int) -> int:
    return max(1, tokens_per_batch // seq_len // BATCH_DIVISOR * BATCH_DIVISOR)


def canonical_steps(
    samples_per_rank: int, seq_lens: Sequence[int], tokens_per_batch: int, seed: int
) -> list[tuple[int, int]]:
    """(sequence length, per-rank batch) steps that cover ``samples_per_rank`` samples: each step's length drawn
    from a generator seeded by the run seed alone, its batch the token budget over that length, the last one
    cut to what is left. The same multiset for every epoch, so an epoch always has the same number of steps."""
    lens = sorted(set(seq_lens))
    gen = torch.Generator().manual_seed(seed)
    steps, left = [], samples_per_rank
    while left > 0:
        seq_len = lens[int(torch.randint(len(lens), (1,), generator=gen))]
        batch = min(step_batch_size(tokens_per_batch, seq_len), left)
        steps.append((seq_len, batch))
        left -= batch
    return steps


@dataclass(frozen=True)
class Step:
    seq_len: int
    patch_idx: int  # which of the patch sizes (--naflex-patch-sizes), 0 with one
    batch: int  # per rank; the same on every rank
    start: int  # the step's first position in the epoch's global order


def plan_steps(
    start: int,
    end: int,
    world: int,
    seq_lens: Sequence[int],
    tokens_per_batch: int,
    patch_probs: Sequence[float],
    seed: int,
    epoch: int,
) -> list[Step]:
    """The steps that take positions [start, end) of an epoch's order on ``world`` ranks (the last step padded to
    a multiple of ``world``). Steps are timm's canonical multiset in an order shuffled by (seed, epoch, start)."""
    per_rank = math.ceil((end - start) / world)
    canonical = canonical_steps(per_rank, seq_lens, tokens_per_batch, seed)
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, start, _PLAN))
    order = torch.randperm(len(canonical), generator=gen).tolist()
    probs = torch.tensor(list(patch_probs), dtype=torch.float64)
    steps, position = [], start
    for i in order:
        seq_len, batch = canonical[i]
        patch_idx = int(torch.multinomial(probs, 1, generator=gen)) if len(probs) > 1 else 0
        steps.append(Step(seq_len, patch_idx, batch, position))
        position += batch * world
    return steps


class NaFlexBatchSampler(Sampler[list]):
    """This rank's batches of an epoch as lists of keys (index, epoch, position, seq_len, patch_idx)."""

    def __init__(
        self,
        order: ResumableDistributedSampler,
        seq_lens: Sequence[int],
        tokens_per_batch: int,
        patch_probs: Sequence[float] = (1.0,),
    ):
        self.order, self.seq_lens, self.tokens = order, list(seq_lens), tokens_per_batch
        total = float(sum(patch_probs))
        self.patch_probs = [p / total for p in patch_probs]
        self.steps = self._plan()

    @property
    def consumed(self) -> int:
        return self.order.consumed

    def set_epoch(self, epoch: int, consumed: int = 0, batches: int = 0) -> None:
        self.order.set_epoch(epoch, consumed)
        self.steps = self._plan()

    def _plan(self) -> list[Step]:
        o = self.order
        args = (o.world_size, self.seq_lens, self.tokens, self.patch_probs, o.seed, o.epoch)
        full = plan_steps(0, o.epoch_length, *args)
        for k, step in enumerate(full):
            if step.start == o.consumed:  # a step boundary of the epoch's own plan: continue it exactly
                return full[k:]
        # A position this worker count's plan never stops at (the checkpoint came from another worker count).
        return plan_steps(o.consumed, o.epoch_length, *args) if o.consumed < o.epoch_length else []

    def __iter__(self):
        o = self.order
        order, world, n = o.order(), o.world_size, o.epoch_length
        for step in self.steps:
            positions = step.start + o.rank + world * torch.arange(step.batch)
            positions = torch.where(positions >= n, positions - n, positions)  # the padding wraps to the start
            yield [
                (index, o.epoch, p, step.seq_len, step.patch_idx)
                for index, p in zip(order[positions].tolist(), positions.tolist())
            ]

    def __len__(self) -> int:
        return len(self.steps)

    def position_after(self, steps_done: int) -> int:
        """The epoch's global samples consumed once ``steps_done`` more steps are trained (all ranks alike); the
        last step's padding wraps to the epoch's start, so never past its length."""
        position = position_after_steps(self.steps, steps_done, self.consumed, self.order.world_size)
        return min(self.order.epoch_length, position)


@dataclass
class NaFlexItem:
    image: torch.Tensor  # C x H x W, sized for the step's patch budget
    target: int
    epoch: int
    position: int
    seq_len: int
    patch_idx: int


class NaFlexTrainDataset(torch.utils.data.Dataset):
    """One key -> the image augmented for its step's (sequence length, patch size), seeded per sample."""

    def __init__(self, base: ImageDataset, transforms: dict, img_mode: str, seed: int):
        self.base, self.transforms, self.img_mode, self.seed = base, transforms, img_mode, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch, position, seq_len, patch_idx = key
        sample = read_sample(self.base, index, self.img_mode)
        if isinstance(sample, BadSample):
            return sample
        img, target = sample
        image = seeded(self.transforms[(seq_len, patch_idx)], img, seed=sample_seed(self.seed, epoch, index))
        return NaFlexItem(image, target, epoch, position, seq_len, patch_idx)


class NaFlexTrainCollate:
    """A step's items -> (patch dict, targets, bad samples): unreadable samples replaced by repeats of readable
    ones (every rank keeps the step's batch size), mixup/cutmix on the images, patchify, pad to the step."""

    def __init__(self, patch_sizes: Sequence[int], mixup: Optional[Callable], seed: int, channels_first: bool = False):
        from timm.data.naflex_transforms import Patchify

        variable = len(patch_sizes) > 1  # timm keeps patches unflattened when their size varies
        layout = {"channels_last": False} if channels_first else {}  # older timm: (P, P, C) only
        self.patchify = [Patchify(patch_size=(p, p), flatten_patches=not variable, **layout) for p in patch_sizes]
        self.mixup, self.seed = mixup, seed

    def __call__(self, samples: list):
        from timm.data.naflex_dataset import NaFlexCollator

        good, bad = split_bad(samples)
        if not good:
            return None, None, bad
        good = [good[i % len(good)] for i in range(len(samples))]
        first = good[0]
        images = [s.image for s in good]
        targets = torch.tensor([s.target for s in good], dtype=torch.int64)
        if self.mixup is not None:
            self.mixup.set_epoch(first.epoch)  # timm's --mixup-off-epoch
            images, soft = seeded(
                self.mixup, images, targets, seed=sample_seed(self.seed, first.epoch, first.position, _MIXUP)
            )
            targets = torch.stack(list(soft))
        patchify = self.patchify[first.patch_idx]
        x, y = NaFlexCollator(first.seq_len)([(patchify(img), t) for img, t in zip(images, targets)])
        return x, y, bad


class NaFlexEvalCollate:
    """Validation: patch dicts of one fixed length (--naflex-max-seq-len); unreadable samples dropped."""

    def __init__(self, max_seq_len: int):
        from timm.data.naflex_dataset import NaFlexCollator

        self.collator = NaFlexCollator(max_seq_len)

    def __call__(self, samples: list):
        good, bad = split_bad(samples)
        if not good:
            return None, None, bad
        x, y = self.collator(good)
        return x, y, bad


def naflex_patch_sizes(cfg, model_patch_size: int) -> list[int]:
    return list(cfg.data.naflex_patch_sizes or [model_patch_size])


def naflex_train_transforms(cfg, data_config: dict, patch_sizes: Sequence[int]) -> dict:
    """timm's training transform for each (sequence length, patch size index): crop and resize to the budget."""
    from timm.data import create_transform

    kwargs = transform_kwargs(cfg, data_config, True)
    return {
        (seq_len, i): create_transform(**kwargs, naflex=True, patch_size=(p, p), max_seq_len=seq_len)
        for seq_len in sorted(set(cfg.data.naflex_train_seq_lens))
        for i, p in enumerate(patch_sizes)
    }


def naflex_eval_transform(
    data_config: dict, patch_size: int, max_seq_len: int, channels_first: bool = False
) -> Callable:
    """timm's NaFlex validation transform: resize (aspect kept) to at most max_seq_len patches, patchify."""
    from timm.data import create_transform

    layout = {"patchify_channels_last": False} if channels_first else {}
    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        naflex=True,
        patch_size=(patch_size, patch_size),
        max_seq_len=max_seq_len,
        patchify=True,
        **layout,
    )


def build_naflex_mixup(cfg, num_classes: int):
    """timm's NaFlexMixup from the run's mixup settings (mode and cutmix min/max do not apply to it)."""
    from timm.data import NaFlexMixup

    if not mixup_active(cfg):
        return None
    kwargs = {k: v for k, v in mixup_kwargs(cfg, num_classes).items() if k not in ("mode", "cutmix_minmax")}
    return NaFlexMixup(**kwargs, mixup_off_epoch=cfg.aug.mixup_off_epoch)
