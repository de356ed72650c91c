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

from raytrain_cls.core.config import Config
from raytrain_cls.data.loader import SkippingLoader, image_mode
from raytrain_cls.data.samples import BadSample
from raytrain_cls.data.shards import shard_files
from raytrain_cls.data.sources import BadImageError, decode_image, manifest_split, read_parquet_manifest
from raytrain_cls.data.transforms import transform_kwargs

DATASET_NAME = "train"


def train_dataset(cfg: Config):
    """The training split as a Ray Dataset of preprocessed uint8 images (built on the driver, run lazily)."""
    import ray.data

    d = cfg.data
    data_config = cfg.resolved.data_config
    fs, paths = shard_files(d.data_dir, manifest_split(read_parquet_manifest(d.data_dir), d.data_dir, d.train_split))
    ds = ray.data.read_parquet(paths, filesystem=fs)
    # Shuffle the blocks (shards) each epoch; the workers add a local shuffle buffer on top.
    ds = ds.randomize_block_order()
    return ds.map_batches(
        preprocess_batch,
        batch_format="numpy",
        batch_size=64,
        fn_kwargs=dict(
            spec=json.dumps(transform_kwargs(cfg, data_config, True)),
            mode=image_mode(data_config),
            max_pixels=d.max_image_pixels,
        ),
    )


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
    images, ok, where, reason = [], [], [], []
    shape = None
    for data, path in zip(batch["image"], batch["path"]):
        try:
            img = decode_image(bytes(data), str(path), max_pixels)
            arr = np.asarray(transform(img.convert(mode) if img.mode != mode else img))
            shape = arr.shape
            images.append(arr)
            ok.append(True)
            where.append("")
            reason.append("")
        except BadImageError as e:
            images.append(None)
            ok.append(False)
            where.append(e.where)
            reason.append(e.reason)
    if shape is None:  # a block with no readable image at all: size the placeholders from the config
        c, h, w = json.loads(spec)["input_size"]
        shape = (c, h, w)
    images = [a if a is not None else np.zeros(shape, dtype=np.uint8) for a in images]
    return {
        "image": np.stack(images),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "ok": np.asarray(ok, dtype=bool),
        "where": np.asarray(where, dtype=object),
        "reason": np.asarray(reason, dtype=object),
    }


class RayDataBatches:
    """This worker's share of the Ray Dataset as (inputs on the device, targets, bad samples), the shape of
    batch a SkippingLoader takes: it does the skipping, counting and refilling, as for the DataLoader paths."""

    def __init__(
        self,
        shard,
        rows_per_worker: int,
        batch_size: int,
        data_config: dict,
        device: torch.device,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        shuffle_buffer: Optional[int] = None,
    ):
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

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        batches = self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer,
            prefetch_batches=2,
        )
        for i, batch in enumerate(batches):
            if i >= self.num_batches:  # every rank takes the same number of steps
                break
            ok = batch["ok"]
            bad = [BadSample(str(w), str(r)) for w, r in zip(batch["where"][~ok], batch["reason"][~ok])]
            if not ok.any():
                yield None, None, bad
                continue
            x = torch.from_numpy(batch["image"][ok]).to(self.device, non_blocking=True)
            x = (x.float() - self.mean) / self.std
            if self.erase is not None:
                x = self.erase(x)
            yield x, torch.from_numpy(batch["label"][ok]), bad


def ray_data_loader(
    shard, rows_per_worker: int, batch_size: int, data_config: dict, device: torch.device, **erasing
) -> SkippingLoader:
    return SkippingLoader(RayDataBatches(shard, rows_per_worker, batch_size, data_config, device, **erasing), fill=True)


def rows_per_worker(num_samples: int, world: int) -> int:
    """streaming_split(equal=True) gives every worker the same number of rows and drops the remainder."""
    return num_samples // world
