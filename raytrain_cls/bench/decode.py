"""Benchmark: timm's CPU JPEG pipeline vs the --gpu-decode path, on synthetic photo-like JPEGs.

    python -m raytrain_cls.bench.decode --images 2048 --size 500x375 --batch-size 256 --device cuda [-j 16]

(a) ``cpu_timm``: PIL decode + timm's ``create_transform`` train transform, per-sample seeding as the CPU loader
    does, in a torch DataLoader with ``-j`` worker processes;
(b) ``device_decode``: ``decode_batch`` alone, and ``device_decode_augment``: ``DeviceTransform`` (decode + crop,
    flips, jitter, normalize) on ``--device``, in the benchmark process.

The encoded bytes sit in memory for both, so neither measures file reads. The last line of output is one JSON
object with every number, for the benchmark doc.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from timm.data import IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset

from raytrain_cls.data.device_transform import DeviceTransform, decode_batch
from raytrain_cls.data.samples import sample_seed

SEED = 0


# --------------------------------------------------------------------------------------------- synthetic data


def smooth_field(rng: np.random.Generator, height: int, width: int, cells: int, channels: int = 1) -> np.ndarray:
    """Random values on a coarse grid (``cells`` rows), bicubically upsampled: smooth structure at one scale."""
    cols = max(2, cells * width // height)
    grid = torch.from_numpy(rng.normal(0, 1, (1, channels, cells + 1, cols + 1)).astype(np.float32))
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[0].numpy()


def random_shapes(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A few flat-coloured ellipses and rectangles with slightly soft edges, and where they are."""
    layer = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 10))):
        left, top = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        box = [left, top, left + int(rng.integers(20, width // 2)), top + int(rng.integers(20, height // 2))]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(int(v) for v in rng.integers(1, 256, 3)))
    pixels = np.asarray(layer.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    return pixels, pixels.sum(-1, keepdims=True) > 0


def photo_like(width: int, height: int, rng: np.random.Generator, grain: float = 8.0) -> Image.Image:
    """Luminance structure at several scales, weaker smooth colour, some objects with edges, and film grain: JPEG
    sizes and decode costs like real photos (white noise would be far larger, flat colour far smaller)."""
    luma = sum(
        weight * smooth_field(rng, height, width, cells)[0]
        for cells, weight in ((2, 50.0), (8, 25.0), (32, 12.0), (96, 6.0))
    )
    chroma = 28.0 * smooth_field(rng, height, width, 3, channels=2)
    ycbcr = np.clip(np.stack([128 + luma, 128 + chroma[0], 128 + chroma[1]], -1), 0, 255).astype(np.uint8)
    background = np.asarray(Image.fromarray(ycbcr, "YCbCr").convert("RGB")).astype(np.float32)
    shapes, covered = random_shapes(rng, width, height)
    picture = np.where(covered, 0.5 * background + 0.5 * shapes, background)
    picture += rng.normal(0, grain, (height, width, 1)) + rng.normal(0, grain / 2, (height, width, 3))
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))


def save_photos(root: str, images: int, classes: int, size: tuple[int, int], indices: Iterable[int]) -> None:
    """Writes pictures ``indices`` of bench make-data's ImageFolder under ``root`` (the first ``images`` to train/,
    the rest to validation/; class = index mod ``classes``), each from its own seed so that any split of the
    indices among processes writes the same files."""
    for i in indices:
        split = "train" if i < images else "validation"
        picture = photo_like(size[0], size[1], np.random.default_rng([SEED, i]))
        picture.save(Path(root) / split / f"class_{i % classes:03d}" / f"{i:07d}.jpg", "JPEG", quality=90)


def synthesize_jpegs(count: int, width: int, height: int, quality: int, unique: int = 256) -> list[bytes]:
    """``count`` JPEGs cycling through ``unique`` distinct pictures (each takes ~40 ms to synthesize; decoders
    cache nothing between calls, so repeats cost as much as new pictures)."""
    rng = np.random.default_rng(SEED)
    distinct = []
    for _ in range(min(count, unique)):
        buf = io.BytesIO()
        photo_like(width, height, rng).save(buf, "JPEG", quality=quality)
        distinct.append(buf.getvalue())
    return [distinct[i % len(distinct)] for i in range(count)]


# ------------------------------------------------------------------------------------------------ (a) CPU path


class SeededTimmJpegs(Dataset):
    """What the CPU loader does per sample: PIL decode, convert to RGB, seed the RNGs, timm train transform."""

    def __init__(self, jpegs: list[bytes], transform: Callable):
        self.jpegs, self.transform = jpegs, transform

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int):
        with Image.open(io.BytesIO(self.jpegs[index])) as img:
            rgb = img.convert("RGB")
        seed = sample_seed(SEED, 0, index)
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return self.transform(rgb), 0


def bench_cpu_timm(jpegs: list[bytes], img_size: int, batch_size: int, workers: int) -> float:
    transform = create_transform(input_size=(3, img_size, img_size), is_training=True, interpolation="random")
    loader = DataLoader(
        SeededTimmJpegs(jpegs, transform),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=False,
    )
    next(iter(loader))  # start the worker processes outside the timing
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- (b) device path


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_batches(run_batch: Callable[[int, int], None], count: int, batch_size: int, device: torch.device) -> float:
    run_batch(0, min(batch_size, count))  # warm-up: CUDA context, nvJPEG handles, kernel selection
    _synchronize(device)
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        run_batch(first, min(first + batch_size, count))
    _synchronize(device)
    return count / (time.perf_counter() - start)


def bench_device(jpegs: list[bytes], img_size: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    seeds = [sample_seed(SEED, 0, i) for i in range(len(encoded))]
    labels = torch.zeros(len(encoded), dtype=torch.long)
    transform = DeviceTransform(True, input_size=(3, img_size, img_size), device=device)

    def decode_only(first: int, last: int) -> None:
        _, bad = decode_batch(encoded[first:last], device)
        assert not bad, f"synthetic JPEGs failed to decode: {bad}"

    def decode_and_augment(first: int, last: int) -> None:
        transform(encoded[first:last], labels[first:last], seeds[first:last])

    decode_rate = _timed_batches(decode_only, len(encoded), batch_size, device)
    full_rate = _timed_batches(decode_and_augment, len(encoded), batch_size, device)
    return decode_rate, full_rate


def profile_augment(jpegs: list[bytes], img_size: int, batch_size: int, device: torch.device, top: int = 12) -> dict:
    """Where one decode + augment batch spends its time, after a warm-up batch: the host's parameter draws timed
    apart, and torch.profiler's ops with the most self time on the device (on the CPU device: on the host), each
    as [name, calls, self device ms, self host ms]. For when device_decode_augment misses its target."""
    from torch.profiler import ProfilerActivity, profile

    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:batch_size]]
    seeds = [sample_seed(SEED, 0, i) for i in range(len(encoded))]
    labels = torch.zeros(len(encoded), dtype=torch.long)
    transform = DeviceTransform(True, input_size=(3, img_size, img_size), device=device)
    transform(encoded, labels, seeds)  # warm-up: allocator, kernels, nvJPEG handles
    _synchronize(device)
    width, height = Image.open(io.BytesIO(jpegs[0])).size
    start = time.perf_counter()
    for seed in seeds:
        transform.draws(height, width, seed)
    draws_ms = (time.perf_counter() - start) * 1000
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        transform(encoded, labels, seeds)
        _synchronize(device)
    on_device = device.type == "cuda"
    ops = sorted(
        prof.key_averages(),
        key=lambda e: e.self_device_time_total if on_device else e.self_cpu_time_total,
        reverse=True,
    )
    return dict(
        profile_batch=len(encoded),
        profile_draws_ms=round(draws_ms, 2),
        profile_top=[
            [e.key, e.count, round(e.self_device_time_total / 1000, 2), round(e.self_cpu_time_total / 1000, 2)]
            for e in ops[:top]
        ],
    )


def parity_with_cpu(jpegs: list[bytes], img_size: int, device: torch.device, count: int = 32) -> dict:
    """The device's output vs the same transform on the CPU device (libjpeg, CPU kernels) for the first ``count``
    images, in 8-bit levels: a sanity check that nvJPEG and the device kernels agree with what the tests pin."""
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:count]]
    seeds = [sample_seed(SEED, 0, i) for i in range(len(encoded))]
    labels = torch.zeros(len(encoded), dtype=torch.long)
    outputs = [
        DeviceTransform(True, input_size=(3, img_size, img_size), device=d)(encoded, labels, seeds)[0].cpu()
        for d in (device, torch.device("cpu"))
    ]
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, -1, 1, 1)  # DeviceTransform's default normalization
    levels = ((outputs[0] - outputs[1]).abs() * std * 255).round()
    return dict(parity_max_levels=levels.max().item(), parity_mean_levels=round(levels.mean().item(), 4))


# ---------------------------------------------------------------------------------------------------- command


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raytrain_cls.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="number of synthetic JPEGs")
    p.add_argument("--size", default="500x375", help="JPEG size WIDTHxHEIGHT (ImageNet's typical 500x375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--unique", type=int, default=256, help="distinct pictures among the --images JPEGs")
    p.add_argument("--img-size", type=int, default=224, help="training crop size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers for (a)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-cpu", action="store_true", help="only measure the device path")
    p.add_argument("--profile", action="store_true", help="profile a decode + augment batch (always on GPUs)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    width, height = parse_size(args.size)
    print(
        f"device: {device_name(device)}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}; {os.cpu_count()} CPU cores",
        flush=True,
    )
    start = time.perf_counter()
    jpegs = synthesize_jpegs(args.images, width, height, args.quality, args.unique)
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(
        f"synthesized {len(jpegs)} JPEGs ({min(args.images, args.unique)} distinct) {width}x{height} "
        f"q{args.quality}, mean {mean_kb:.0f} KB, "
        f"in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    result = dict(
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        timm=timm.__version__,
        cpu_cores=os.cpu_count(),
        images=len(jpegs),
        size=f"{width}x{height}",
        jpeg_kb=round(mean_kb, 1),
        img_size=args.img_size,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if not args.skip_cpu:
        result["cpu_timm_img_s"] = round(bench_cpu_timm(jpegs, args.img_size, args.batch_size, args.workers), 1)
        print(f"(a) timm CPU pipeline, {args.workers} workers: {result['cpu_timm_img_s']} img/s", flush=True)
    decode_rate, full_rate = bench_device(jpegs, args.img_size, args.batch_size, device)
    result["device_decode_img_s"] = round(decode_rate, 1)
    result["device_decode_augment_img_s"] = round(full_rate, 1)
    print(f"(b) on {device}: decode {decode_rate:.1f} img/s, decode + augment {full_rate:.1f} img/s", flush=True)
    if device.type != "cpu" or args.profile:
        result.update(profile_augment(jpegs, args.img_size, args.batch_size, device))
        print(f"host parameter draws per batch: {result['profile_draws_ms']} ms", flush=True)
        for name, calls, device_ms, host_ms in result["profile_top"]:
            print(f"  {name[:60]:60s} {calls:6d} calls  {device_ms:9.2f} ms device  {host_ms:9.2f} ms host")
    if device.type != "cpu":
        result.update(parity_with_cpu(jpegs, args.img_size, device))
        print(
            f"parity with the CPU device: max {result['parity_max_levels']} levels, "
            f"mean {result['parity_mean_levels']}",
            flush=True,
        )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
