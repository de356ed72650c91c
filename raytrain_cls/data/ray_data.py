"""The Ray Data input path (--loader ray): Parquet shards -> map_batches (decode + timm augmentation on any
node's CPUs) -> streaming_split across the training workers -> uint8 batches normalised on the device.

Why: on a cluster, CPU-only nodes can feed the GPU nodes, and each shard is read once per epoch across the whole
cluster. What it gives up against the DataLoader path: the sample order is not a function of (seed, epoch)
(Ray Data's block order and shuffle buffer are not replayable), so a run resumes at the start of an epoch, never
inside one (config validation refuses --recovery-interval with it).

Ray Data runs its tasks on CPUs that the training workers have not reserved: leave at least one free (e.g.
``resources_per_worker: {CPU: 0.5}`` on a small machine); with none free it waits forever.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import numpy as np
import torch

from ..config import Config
from .loader import BadSampleLog, image_mode
from .shards import read_manifest, shard_files
from .sources import SPLIT_SYNONYMS, BadImageError, DataError, decode_image
from .transforms import transform_kwargs

DATASET_NAME = "train"


def train_dataset(cfg: Config):
    """The training split as a Ray Dataset of preprocessed uint8 images (built on the driver, run lazily)."""
    import ray.data

    d = cfg.data
    manifest = read_manifest(d.data_dir)
    name = next((n for n in SPLIT_SYNONYMS.get(d.train_split, (d.train_split,)) if n in manifest.splits), None)
    if name is None:
        raise DataError(f"{d.data_dir} has no '{d.train_split}' split (it has {sorted(manifest.splits)})")
    data_config = cfg.resolved["data_config"]
    fs, paths = shard_files(d.data_dir, manifest.splits[name])
    ds = ray.data.read_parquet(paths, filesystem=fs)
    # Shuffle the blocks (shards) each epoch; the workers add a local shuffle buffer on top.
    ds = ds.randomize_block_order()
    return ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=64,
                          fn_kwargs=dict(spec=json.dumps(transform_kwargs(cfg, data_config, True)),
                                         mode=image_mode(data_config), max_pixels=d.max_image_pixels))


@functools.lru_cache(maxsize=4)
def _cpu_transform(spec: str):
    """timm's training transform without the final normalisation (as timm's prefetcher path: uint8 out; the
    normalisation and random erasing run on the training device)."""
    from timm.data import create_transform

    kwargs = json.loads(spec)
    for key in ("input_size", "mean", "std", "scale", "ratio"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    kwargs["re_prob"] = 0.0
    return create_transform(**kwargs, use_prefetcher=True)


def preprocess_batch(batch: dict, spec: str, mode: str, max_pixels: int) -> dict:
    """Decode and augment one block of rows. A bad image becomes a zero image with ok=False and its reason, so
    the batch keeps its shape and the training worker can count and skip it."""
    transform = _cpu_transform(spec)
    images, ok, why = [], [], []
    shape = None
    for data, path in zip(batch["image"], batch["path"]):
        try:
            img = decode_image(bytes(data), str(path), max_pixels)
            arr = np.asarray(transform(img.convert(mode) if img.mode != mode else img))
            shape = arr.shape
            images.append(arr)
            ok.append(True)
            why.append("")
        except BadImageError as e:
            images.append(None)
            ok.append(False)
            why.append(f"{e.where} ({e.reason})")
    if shape is None:  # a block with no readable image at all: size the placeholders from the config
        c, h, w = json.loads(spec)["input_size"]
        shape = (c, h, w)
    images = [a if a is not None else np.zeros(shape, dtype=np.uint8) for a in images]
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64),
            "ok": np.asarray(ok, dtype=bool), "why": np.asarray(why, dtype=object)}


class RayDataLoader:
    """This worker's share of the Ray Dataset as (inputs, targets) batches, the same interface as SkippingLoader:
    len(), .bad, set_epoch(). Bad rows are skipped, counted and refilled from the batch's readable ones."""

    def __init__(self, shard, rows_per_worker: int, batch_size: int, data_config: dict, device: torch.device,
                 re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1, shuffle_buffer: Optional[int] = None):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.num_batches = rows_per_worker // batch_size
        self.shuffle_buffer = shuffle_buffer or 4 * batch_size
        c = data_config["input_size"][0]
        self.mean = torch.tensor(data_config["mean"], device=device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(data_config["std"], device=device).view(1, c, 1, 1) * 255
        self.erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=str(device))
        self.bad = BadSampleLog()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        batches = self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=self.shuffle_buffer, prefetch_batches=2)
        for i, batch in enumerate(batches):
            if i >= self.num_batches:  # every rank takes the same number of steps
                break
            ok = torch.from_numpy(batch["ok"])
            if not ok.all():
                self.bad.count += int((~ok).sum())
                self.bad.examples += [str(w) for w in batch["why"][~batch["ok"]]][:BadSampleLog.KEEP]
                self.bad.examples = self.bad.examples[:BadSampleLog.KEEP]
                if not ok.any():
                    raise DataError(f"every sample of a training batch was unreadable, e.g. {self.bad.examples[0]}")
            good = torch.nonzero(ok).flatten()
            keep = good[torch.arange(len(ok)) % len(good)]  # refill skipped rows from the readable ones
            x = torch.from_numpy(batch["image"])[keep].to(self.device, non_blocking=True)
            y = torch.from_numpy(batch["label"])[keep]
            x = (x.float() - self.mean) / self.std
            if self.erase is not None:
                x = self.erase(x)
            yield x, y


def rows_per_worker(num_samples: int, world: int) -> int:
    """streaming_split(equal=True) gives every worker the same number of rows and drops the remainder."""
    return num_samples // world
