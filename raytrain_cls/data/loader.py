"""Per-worker DataLoaders: this rank's share of the data, timm transforms, deterministic augmentation.

Augmentation randomness is a pure function of (seed, epoch, sample index, copy): the training sampler yields
(index, epoch, copy) keys and each sample re-seeds python/numpy/torch RNGs before its transform. So the augmented
sample does not depend on the number of Ray workers, loader processes, or on where a resumed run restarted; the
copy number (--aug-repeats) gives each repeat of a sample its own augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from raytrain_cls.core.config import Config
from raytrain_cls.core.size_schedule import SizeSchedule, size_schedule
from raytrain_cls.data.device_transform import build_device_transform
from raytrain_cls.data.naflex import (
    NaFlexBatchSampler,
    NaFlexEvalCollate,
    NaFlexTrainCollate,
    NaFlexTrainDataset,
    build_naflex_mixup,
    naflex_eval_transform,
    naflex_patch_sizes,
    naflex_train_transforms,
)
from raytrain_cls.data.resident import DrawnParams, ResidentBatches, check_fits, image_bytes, listed, load_resident
from raytrain_cls.data.sampler import ResumableDistributedSampler, ShardSampler
from raytrain_cls.data.samples import (
    BadSample,
    kept_rngs,
    read_sample,
    sample_seed,
    seeded,
    split_bad,
    split_choice,
)
from raytrain_cls.data.scheduled import ScheduledBatchSampler
from raytrain_cls.data.sources import BadImageError, DataError, ImageDataset, ParquetImages, Source
from raytrain_cls.data.transforms import build_transform


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a transform in the loader process; for training, seeds the RNGs per (seed, epoch, index).
    ``transform`` may be one per size choice (--train-img-sizes), picked by the choice the key carries."""

    def __init__(self, base: ImageDataset, transform, img_mode: str, seed: int | None = None):
        self.base, self.img_mode, self.seed = base, img_mode, seed
        self.transforms = list(transform) if isinstance(transform, (list, tuple)) else [transform]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch, copy, choice = split_choice(key)
        sample = read_sample(self.base, index, self.img_mode)
        if isinstance(sample, BadSample):
            return sample
        img, target = sample
        transform = self.transforms[choice]
        if self.seed is None:
            return transform(img), target
        return seeded(transform, img, seed=sample_seed(self.seed, epoch, index, copy)), target


def collate_skipping_bad(samples: list):
    """(inputs, targets, bad samples): the readable samples collated as usual, the unreadable ones listed."""
    good, bad = split_bad(samples)
    if not good:
        return None, None, bad
    x, y = default_collate(good)
    if isinstance(x, (list, tuple)):  # --aug-splits: split-major rows (all clean views, then each augmented set)
        x, y = torch.cat(list(x)), y.repeat(len(x))
    return x, y, bad


class BadSampleLog:
    """Unreadable samples seen by this rank: a count and the first few (path, reason) as examples."""

    KEEP = 10

    def __init__(self):
        self.count, self.examples = 0, []

    def add(self, bad: list[BadSample]) -> None:
        self.count += len(bad)
        for b in bad[: max(0, self.KEEP - len(self.examples))]:
            self.examples.append(f"{b.where} ({b.reason})")

    def reset(self) -> None:
        self.count, self.examples = 0, []


class EncodedDataset(torch.utils.data.Dataset):
    """--gpu-decode: the loader process only reads the encoded bytes; decoding and augmentation happen on the
    training device (DeviceTransform) with the same per-(seed, epoch, index) seeds as the CPU path."""

    def __init__(self, base: ImageDataset, seed: int | None = None):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch, copy, choice = split_choice(key)
        try:
            data, target = self.base.encoded(index)
        except BadImageError as e:
            return BadSample(e.where, e.reason)
        seed = sample_seed(self.seed, epoch, index, copy) if self.seed is not None else 0
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return tensor, target, seed, self.base.describe(index), choice


def collate_encoded(samples: list):
    """(encoded byte tensors, targets, seeds, where each came from, the batch's size choice, bad samples): nothing
    decoded yet."""
    good, bad = split_bad(samples)
    return (
        [s[0] for s in good],
        torch.tensor([s[1] for s in good], dtype=torch.int64),
        [s[2] for s in good],
        [s[3] for s in good],
        good[0][4] if good else 0,
        bad,
    )


class DeviceDecode:
    """Turns a collate_encoded batch into (inputs on the device, targets, bad samples) with a DeviceTransform
    (one per size choice with --train-img-sizes)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, batch):
        encoded, targets, seeds, wheres, choice, bad = batch
        if not encoded:
            return None, None, bad
        x, y, failed = self.transforms[choice](encoded, targets, seeds)
        bad = bad + [
            BadSample(
                wheres[i], "cannot be decoded (corrupt, truncated, not an image, or more than --max-image-pixels)"
            )
            for i in failed
        ]
        return (x, y, bad) if len(y) else (None, None, bad)


_END = object()  # the end of a loader's batches


class SkippingLoader:
    """Iterates a DataLoader built with collate_skipping_bad, yielding (inputs, targets) and logging bad samples.

    Training batches keep their full size: the readable samples of a batch are repeated to replace the skipped
    ones, so every rank takes the same steps with the same shapes (DDP, mixup pairs, compiled graphs). A training
    batch with no readable sample at all is an error; a validation batch shrinks (every sample counted once).
    """

    def __init__(self, loader: DataLoader, fill: bool, decode=None, splits: int = 1, collate_fills: bool = False):
        self.loader, self.fill, self.decode, self.bad = loader, fill, decode, BadSampleLog()
        self.splits = max(1, splits)  # --aug-splits: rows are split-major, refill within each split
        self.collate_fills = collate_fills  # the collate function already refilled the batch (NaFlex)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    def _batches(self):
        """The loader's batches; loaded in this process (-j 0), each inside one kept_rngs() for all its samples."""
        if getattr(self.loader, "num_workers", 0) > 0:
            yield from self.loader
            return
        batches = iter(self.loader)
        while True:
            with kept_rngs():
                batch = next(batches, _END)
            if batch is _END:
                return
            yield batch

    def __iter__(self):
        for batch in self._batches():
            x, y, bad = self.decode(batch) if self.decode is not None else batch
            if bad:
                self.bad.add(bad)
            if x is None:
                if self.fill:
                    raise DataError(
                        f"every sample of a training batch was unreadable, e.g. {bad[0].where} "
                        f"({bad[0].reason}): check the data set"
                    )
                continue
            if self.fill and bad and not self.collate_fills:
                n = len(y) // self.splits
                refill = torch.arange(len(bad), device=y.device) % n
                xs, ys = x.reshape(self.splits, n, *x.shape[1:]), y.reshape(self.splits, n)
                x = torch.cat([xs, xs[:, refill]], dim=1).reshape(-1, *x.shape[1:])
                y = torch.cat([ys, ys[:, refill]], dim=1).reshape(-1)
            yield x, y


class _EpochTagged(Sampler):
    """Yields (index, epoch, copy) so loader processes know which epoch (and repeat) a sample belongs to."""

    def __init__(self, inner: ResumableDistributedSampler):
        self.inner = inner

    def __iter__(self):
        epoch = self.inner.epoch
        return ((i, epoch, copy) for i, copy in self.inner.tagged())

    def __len__(self) -> int:
        return len(self.inner)


@dataclass
class Loaders:
    train: SkippingLoader
    val: SkippingLoader
    train_sampler: ResumableDistributedSampler  # or, with --naflex-loader, a NaFlexBatchSampler
    batch_size: int = 0  # per rank; NaFlex batches vary by step

    def set_epoch(self, epoch: int, consumed: int = 0, batches: int = 0) -> None:
        """Start (or, after ``batches`` batches up to position ``consumed``, continue) an epoch."""
        self.train_sampler.set_epoch(epoch, consumed, batches)
        self.train.bad.reset()
        self.val.bad.reset()

    def first_batch(self, estimate: int) -> int:
        """The index, in the epoch, of the batch the loader continues at: a scheduled-size plan knows it; for the
        others it is ``estimate`` (the recorded count, or the position over the global batch)."""
        return getattr(self.train_sampler, "first_batch", estimate)

    def samples_after(self, batches: int) -> int:
        """The epoch's global samples consumed once every rank has trained ``batches`` more batches from where
        the epoch was (re)started: what a recovery checkpoint records as its position."""
        position_after = getattr(self.train_sampler, "position_after", None)
        if position_after is not None:
            return position_after(batches)
        return self.train_sampler.consumed + batches * self.batch_size * self.train_sampler.world_size


def image_mode(data_config: dict) -> str:
    """PIL mode the model's input wants: grey for one input channel, else RGB."""
    return "L" if data_config["input_size"][0] == 1 else "RGB"


def build_loaders(
    cfg: Config, source: Source, data_config: dict, rank: int, world_size: int, device: torch.device | str = "cpu"
) -> Loaders:
    d = cfg.data
    if d.naflex_loader:
        return build_naflex_loaders(cfg, source, data_config, rank, world_size)
    if d.data_on_device:
        return build_resident_loaders(cfg, source, data_config, rank, world_size, device)
    schedule = size_schedule(cfg)
    train_configs = train_data_configs(data_config, schedule)
    if d.gpu_decode:
        train_ds, val_ds = EncodedDataset(source.train, seed=cfg.run.seed), EncodedDataset(source.val)
        collate = collate_encoded
        decode = [
            DeviceDecode([build_device_transform(cfg, c, True, device) for c in train_configs]),
            DeviceDecode([build_device_transform(cfg, data_config, False, device)]),
        ]
    else:
        mode = image_mode(data_config)
        train_transforms = [build_transform(cfg, c, True) for c in train_configs]
        train_ds = TransformedDataset(source.train, train_transforms, mode, seed=cfg.run.seed)
        val_ds = TransformedDataset(source.val, build_transform(cfg, data_config, False), mode)
        collate, decode = collate_skipping_bad, [None, None]
    sampler = _train_sampler(cfg, source, rank, world_size)
    batching, train_sampler = _train_batching(sampler, schedule, d.batch_size)
    # The loader's own generator: otherwise each new iterator draws its base seed from the global torch RNG,
    # which would shift the training RNG stream by where a resumed run restarted.
    common = dict(
        num_workers=d.workers,
        pin_memory=d.pin_mem and not d.gpu_decode,
        persistent_workers=d.workers > 0,
        generator=torch.Generator().manual_seed(cfg.run.seed),
        collate_fn=collate,
    )
    train = DataLoader(train_ds, **batching, **common)
    val = DataLoader(
        val_ds,
        batch_size=d.validation_batch_size or d.batch_size,
        sampler=ShardSampler(len(val_ds), rank, world_size),
        drop_last=False,
        **common,
    )
    _check_full_batch(len(train), d.batch_size, world_size, len(train_ds))
    return Loaders(
        SkippingLoader(train, fill=True, decode=decode[0], splits=cfg.aug.aug_splits),
        SkippingLoader(val, fill=False, decode=decode[1]),
        train_sampler,
        d.batch_size,
    )


def train_data_configs(data_config: dict, schedule: Optional[SizeSchedule]) -> list[dict]:
    """The data config of each size choice (--train-img-sizes: square sizes, the channels kept), or the one."""
    if schedule is None:
        return [data_config]
    channels = data_config["input_size"][0]
    return [{**data_config, "input_size": (channels, size, size)} for size in schedule.img_sizes]


def _train_batching(
    sampler: ResumableDistributedSampler, schedule: Optional[SizeSchedule], batch_size: int
) -> tuple[dict, Sampler]:
    """(the training DataLoader's batching arguments, the sampler that owns the epoch's position)."""
    if schedule is None:
        return dict(batch_size=batch_size, sampler=_EpochTagged(sampler), drop_last=True), sampler
    batches = ScheduledBatchSampler(sampler, schedule)
    return dict(batch_sampler=batches), batches


def _check_full_batch(batches: int, batch_size: int, world_size: int, samples: int) -> None:
    if batches == 0:
        raise ValueError(
            f"data.batch_size {batch_size} x {world_size} workers is larger than the {samples} "
            f"training samples: no full batch per epoch"
        )


def _train_sampler(cfg: Config, source: Source, rank: int, world_size: int) -> ResumableDistributedSampler:
    """The epoch's order for this rank. Elastic training (the worker has set its batch and accumulation for the
    group's size) trains whole global batches only, so every update of every size is one."""
    d = cfg.data
    elastic = cfg.scaling.worker_range() is not None
    return ResumableDistributedSampler(
        len(source.train),
        rank,
        world_size,
        seed=cfg.run.seed,
        shuffle=True,
        repeats=d.epoch_repeats,
        aug_repeats=cfg.aug.aug_repeats,
        whole_batches=d.batch_size * world_size * cfg.optim.grad_accum_steps if elastic else 0,
        **_shard_order(source.train, d.shuffle_window),
    )


def build_resident_loaders(
    cfg: Config, source: Source, data_config: dict, rank: int, world_size: int, device: torch.device | str = "cpu"
) -> Loaders:
    """--data-on-device (resident.py): the whole training split and this rank's validation share decoded onto
    the device once; batches gathered there in the samplers' order and augmented by a DeviceTransform."""
    d, device = cfg.data, torch.device(device)
    mode = image_mode(data_config)
    channels = 1 if mode == "L" else 3
    val_order = ShardSampler(len(source.val), rank, world_size)
    check_fits(image_bytes(source.train, channels) + image_bytes(source.val, channels, len(val_order)), device)
    train = load_resident(source.train, range(len(source.train)), device, mode)
    val = load_resident(source.val, val_order, device, mode)
    sampler = _train_sampler(cfg, source, rank, world_size)
    schedule = size_schedule(cfg)
    batching, train_sampler = _train_batching(sampler, schedule, d.batch_size)
    # one per size choice (--train-img-sizes): the crops are resized on the device to the batch's size
    transforms = [build_device_transform(cfg, c, True, device) for c in train_data_configs(data_config, schedule)]
    if transforms[0].augments:
        # -j N: loader processes draw the per-sample augmentation parameters ahead; pixels never leave the device.
        draws = DataLoader(
            DrawnParams(train, transforms[0].draws, cfg.run.seed),
            **batching,
            num_workers=d.workers,
            persistent_workers=d.workers > 0,
            collate_fn=listed,
            generator=torch.Generator().manual_seed(cfg.run.seed),
        )  # not the training RNG stream
        train_batches = ResidentBatches(train, draws, d.batch_size, True, transforms, drawn=True)
    elif schedule is not None:  # --no-aug: nothing to draw; the plan's batches of keys
        train_batches = ResidentBatches(train, train_sampler, d.batch_size, True, transforms, batched=True)
    else:  # --no-aug: nothing to draw
        train_batches = ResidentBatches(train, _EpochTagged(sampler), d.batch_size, True, transforms)
    val_batches = ResidentBatches(
        val,
        val_order,
        d.validation_batch_size or d.batch_size,
        False,
        [build_device_transform(cfg, data_config, False, device)],
    )
    _check_full_batch(len(train_batches), d.batch_size, world_size, len(train))
    return Loaders(
        SkippingLoader(train_batches, fill=True), SkippingLoader(val_batches, fill=False), train_sampler, d.batch_size
    )


def build_naflex_loaders(cfg: Config, source: Source, data_config: dict, rank: int, world_size: int) -> Loaders:
    """--naflex-loader: variable-resolution patch batches for training, one fixed length for validation."""
    d, res = cfg.data, cfg.resolved
    mode = image_mode(data_config)
    patch_sizes = naflex_patch_sizes(cfg, res.naflex_patch_size)
    order = ResumableDistributedSampler(
        len(source.train),
        rank,
        world_size,
        seed=cfg.run.seed,
        shuffle=True,
        repeats=d.epoch_repeats,
        **_shard_order(source.train, d.shuffle_window),
    )
    batches = NaFlexBatchSampler(
        order,
        d.naflex_train_seq_lens,
        d.batch_size * max(d.naflex_train_seq_lens),
        d.naflex_patch_size_probs or [1.0] * len(patch_sizes),
    )
    common = dict(
        num_workers=d.workers,
        pin_memory=d.pin_mem,
        persistent_workers=d.workers > 0,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    train_ds = NaFlexTrainDataset(
        source.train, naflex_train_transforms(cfg, data_config, patch_sizes), mode, cfg.run.seed
    )
    collate = NaFlexTrainCollate(
        patch_sizes, build_naflex_mixup(cfg, res.num_classes), cfg.run.seed, d.naflex_patchify_channels_first
    )
    train = DataLoader(train_ds, batch_sampler=batches, collate_fn=collate, **common)
    val_ds = TransformedDataset(
        source.val,
        naflex_eval_transform(
            data_config, res.naflex_patch_size, d.naflex_max_seq_len, d.naflex_patchify_channels_first
        ),
        mode,
    )
    val = DataLoader(
        val_ds,
        batch_size=d.validation_batch_size or d.batch_size,
        drop_last=False,
        sampler=ShardSampler(len(val_ds), rank, world_size),
        collate_fn=NaFlexEvalCollate(d.naflex_max_seq_len),
        **common,
    )
    return Loaders(SkippingLoader(train, fill=True, collate_fills=True), SkippingLoader(val, fill=False), batches)


def _shard_order(dataset: ImageDataset, window: int) -> dict:
    """Sampler arguments for sharded data (shuffle shards, then samples within a window of shards), and a shard
    cache big enough for the window a loader process is in plus the next one."""
    if not isinstance(dataset, ParquetImages):
        return {}
    dataset.reader.cache_shards = max(2, 2 * window)
    return dict(blocks=dataset.reader.split.shard_sizes(), window=window)
