"""--data-on-device: the whole data set decoded once, kept on the training device, augmented there in batches.

For data sets that fit in device memory (Fashion-MNIST's 70,000 images take 165 MB as RGB uint8), loader processes,
per-sample PIL transforms and host-to-device copies are pure overhead: every step can gather its batch from
device memory and augment it with the --gpu-decode path's DeviceTransform (same parameters, same
distributions as timm's CPU transforms, drawn from the same per-(seed, epoch, index) seeds). Nothing else
changes: the samplers are the DataLoader path's, so the order, the mid-epoch resume position and the
per-epoch counts of unreadable images are exactly what they are there.

Each rank holds the whole training split (a resumed run may deal the samples to a different number of ranks)
and its own share of the validation split. Images are decoded with PIL on the CPU, as the CPU path decodes
them, one after another (a data set small enough for this decodes in seconds: Fashion-MNIST in about one); a
bad image is found once, at load, and is then skipped and counted every time the sampler deals it, as the
other paths do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from raytrain_cls.data.device_transform import to_device
from raytrain_cls.data.samples import BadSample, read_sample, sample_seed, split_choice
from raytrain_cls.data.sources import DataError, ImageDataset

# Of the device memory free at load, the resident data set may take at most this share: the model, its
# activations and the optimizer state need the rest. CPU workers share their host's memory with each other (and
# with Ray's object store), so each may take a smaller share of what the host has available.
MAX_MEMORY_SHARE = 0.5
MAX_HOST_MEMORY_SHARE = 0.25


@dataclass
class ResidentImages:
    """A split's images as uint8 (C,H,W) tensors on the device (None for an unreadable image), and labels."""

    images: list
    labels: torch.Tensor  # int64, on the CPU: a batch's labels are gathered there and sent with its pixels
    bad: dict = field(default_factory=dict)  # index -> BadSample
    nbytes: int = 0
    block: Optional[torch.Tensor] = None  # (N,C,H,W) when every image has one size: ``images`` are its rows

    def __len__(self) -> int:
        return len(self.images)


def image_bytes(dataset: ImageDataset, channels: int, count: Optional[int] = None) -> int:
    """The uint8 size of ``count`` (default: all) decoded images, from the first image's size (exact for data
    sets of one image size, an estimate otherwise)."""
    count = len(dataset) if count is None else count
    first = read_sample(dataset, 0, "L" if channels == 1 else "RGB") if len(dataset) else None
    if first is None or isinstance(first, BadSample):
        return 0
    width, height = first[0].size
    return count * channels * height * width


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for data on ``device``: CUDA's free memory, or the host's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_fits(need: int, device: torch.device) -> None:
    """Refuses, before decoding anything, data that would take more than its share of the memory available on
    ``device`` (MAX_MEMORY_SHARE of a GPU's free memory, MAX_HOST_MEMORY_SHARE of the host's available memory):
    a clear error instead of an out-of-memory kill mid-load."""
    free = available_memory(device)
    share = MAX_MEMORY_SHARE if device.type == "cuda" else MAX_HOST_MEMORY_SHARE
    if free is not None and need > share * free:
        where = "device" if device.type == "cuda" else "host"
        raise DataError(
            f"--data-on-device: the data set needs about {need / 2**30:.2f} GiB of {where} memory but "
            f"only {free / 2**30:.2f} GiB are available (at most {share:.0%} of it goes to data): "
            f"drop --data-on-device, or use --gpu-decode"
        )


def load_resident(dataset: ImageDataset, indices: Iterable[int], device: torch.device, mode: str) -> ResidentImages:
    """Decodes ``indices`` of ``dataset`` (PIL, in ``mode``) onto ``device``; the other entries stay None."""
    decoded: dict[int, torch.Tensor] = {}
    bad: dict = {}
    for index in indices:
        sample = read_sample(dataset, index, mode)
        if isinstance(sample, BadSample):
            bad[index] = sample
        else:
            pixels = np.array(sample[0], dtype=np.uint8)  # a copy: PIL's buffer is read-only
            decoded[index] = torch.from_numpy(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    images: list = [None] * len(dataset)
    order = sorted(decoded)
    block = None
    if len({decoded[i].shape for i in order}) == 1 and len(order) == len(dataset):
        # One size and nothing unreadable (the usual small data set): one block, one copy to the device, and a
        # batch is one gather from it.
        block = torch.stack([decoded[i] for i in order]).to(device)
        images = list(block.unbind(0))
    else:
        for i in order:
            images[i] = decoded[i].contiguous().to(device)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return ResidentImages(images, labels, bad, sum(decoded[i].numel() for i in order), block)


class DrawnParams(torch.utils.data.Dataset):
    """Training keys (index, epoch, copy[, size choice]) -> (index, SampleParams, size choice), or (index,
    BadSample, size choice) for an image found unreadable at load. Holds only plain data (image sizes, the
    ParamDraws), so loader processes can draw the next batches' parameters while the training process runs the
    step: the per-sample random draws, which must stay per-sample (they reproduce timm's CPU transforms seed for
    seed), are then off the training process."""

    def __init__(self, split: ResidentImages, draws, seed: int):
        self.sizes = (
            [tuple(split.block.shape[-2:])] * len(split)
            if split.block is not None
            else [None if img is None else tuple(img.shape[-2:]) for img in split.images]
        )
        self.bad, self.draws, self.seed = dict(split.bad), draws, seed

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, key):
        index, epoch, copy, choice = split_choice(key)
        if self.sizes[index] is None:
            return index, self.bad[index], choice
        # The draws do not depend on the output size: every size choice's transform shares them.
        return index, self.draws(*self.sizes[index], sample_seed(self.seed, epoch, index, copy)), choice


def listed(batch: list) -> list:
    """collate_fn that keeps a batch of (index, params, size choice) as it is."""
    return batch


class ResidentBatches:
    """Batches of a ResidentImages split, in SkippingLoader's input form (inputs, targets, bad samples).

    ``keys`` yields either batches of (index, SampleParams | BadSample, size choice) (training: a DataLoader over
    DrawnParams), or batches of keys (training with --no-aug and scheduled sizes: their batch sampler), or single
    keys, batched here (validation, and training with --no-aug). ``transforms``: one per size choice."""

    def __init__(
        self,
        split: ResidentImages,
        keys: Iterable,
        batch_size: int,
        drop_last: bool,
        transforms: list,
        drawn: bool = False,
        batched: bool = False,
    ):
        self.split, self.keys, self.batch_size, self.drop_last = split, keys, batch_size, drop_last
        self.transforms, self.drawn, self.batched = transforms, drawn, batched or drawn
        self.dataset = split

    def __len__(self) -> int:
        if self.batched:
            return len(self.keys)
        n = len(self.keys)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.drawn:
            for batch in self.keys:
                yield self._batch(batch)
            return
        if self.batched:
            for keys in self.keys:
                yield self._batch([_undrawn(key) for key in keys])
            return
        batch = []
        for key in self.keys:
            batch.append(_undrawn(key))
            if len(batch) == self.batch_size:
                yield self._batch(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._batch(batch)

    def _batch(self, entries: list):
        indices, params, bad = [], [], []
        transform = self.transforms[entries[0][2]]  # a batch has one size choice
        for index, drawn, _ in entries:
            if self.split.images[index] is None:
                bad.append(self.split.bad[index])
                continue
            indices.append(index)
            params.append(drawn)
        if not indices:
            return None, None, bad
        picked = torch.tensor(indices, dtype=torch.int64)
        if self.split.block is not None:
            images = self.split.block[to_device(picked, self.split.block.device)]  # pinned: no stream wait
        else:
            images = [self.split.images[i] for i in indices]
        targets = self.split.labels[picked]
        if self.drawn:
            x, y = transform.from_params(images, targets, params)
        else:
            x, y = transform.from_decoded(images, targets)
        return x, y, bad


def _undrawn(key) -> tuple:
    """A key as a batch entry with nothing drawn: (index, None, size choice)."""
    index, _, _, choice = split_choice(key)
    return index, None, choice
