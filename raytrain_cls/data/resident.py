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

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .loader import BadSample, _split_key, read_sample, sample_seed
from .sources import DataError, ImageDataset

# Of the device memory free at load, the resident data set may take at most this share: the model, its
# activations and the optimizer state need the rest.
MAX_MEMORY_SHARE = 0.5


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


def check_fits(need: int, device: torch.device) -> None:
    """Refuses, before decoding anything, data that would take more than MAX_MEMORY_SHARE of the free device
    memory (CUDA only: on the CPU the host's memory is the limit, and the OS says so)."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need > MAX_MEMORY_SHARE * free:
        raise DataError(f"--data-on-device: the data set needs about {need / 2**30:.2f} GiB of device memory but "
                        f"only {free / 2**30:.2f} GiB are free (at most {MAX_MEMORY_SHARE:.0%} of it goes to data): "
                        f"drop --data-on-device, or use --gpu-decode")


def load_resident(dataset: ImageDataset, indices: Iterable[int], device: torch.device, mode: str,
                  progress: Optional[Callable[[int], None]] = None) -> ResidentImages:
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
        if progress is not None:
            progress(1)
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


class ResidentBatches:
    """Batches of a ResidentImages split in a sampler's order, in SkippingLoader's input form
    (inputs, targets, bad samples): training keys are (index, epoch, copy) and seed each sample's augmentation
    as loader.TransformedDataset does; validation keys are plain indices."""

    def __init__(self, split: ResidentImages, sampler: Iterable, batch_size: int, drop_last: bool, transform,
                 seed: Optional[int] = None):
        self.split, self.sampler, self.batch_size, self.drop_last = split, sampler, batch_size, drop_last
        self.transform, self.seed = transform, seed
        self.dataset = split

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        keys = []
        for key in self.sampler:
            keys.append(key)
            if len(keys) == self.batch_size:
                yield self._batch(keys)
                keys = []
        if keys and not self.drop_last:
            yield self._batch(keys)

    def _batch(self, keys: list):
        images, indices, seeds, bad = [], [], [], []
        for key in keys:
            index, epoch, copy = _split_key(key)
            image = self.split.images[index]
            if image is None:
                bad.append(self.split.bad[index])
                continue
            images.append(image)
            indices.append(index)
            if self.seed is not None:
                seeds.append(sample_seed(self.seed, epoch, index, copy))
        if not images:
            return None, None, bad
        picked = torch.tensor(indices, dtype=torch.int64)
        if self.split.block is not None:
            images = self.split.block[picked.to(self.split.block.device)]
        targets = self.split.labels[picked]
        x, y = self.transform.from_decoded(images, targets, seeds if self.seed is not None else None)
        return x, y, bad
