"""What the benchmarks share: the environment and table of every result, photo-like data, and the loader and
Ray Train measurements of one input path (``bench loader`` / ``bench train``)."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from raytrain_cls.bench.decode import save_photos
from raytrain_cls.commands.cli import build_parser, overrides_of
from raytrain_cls.core.config import Config
from raytrain_cls.data import build_loaders, build_source
from raytrain_cls.run.driver import train
from raytrain_cls.run.preflight import resolve_data_config

PATHS = ("torch", "gpu", "device", "ray")  # DataLoader + CPU transforms, --gpu-decode, --data-on-device, Ray Data


def table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The rows as an aligned text table of those columns that any row has (JSON lines stay the record)."""
    columns = [c for c in columns if any(c in r for r in rows)]

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)[:60]

    cells = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([title, *lines])


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """For people, on stderr: stdout keeps one JSON line per result for scripts (and gpu-checks' files)."""
    print(table(title, rows, columns), file=sys.stderr, flush=True)


def environment(device: str = "cpu") -> dict:
    import torch
    import torchvision

    name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))

    return dict(
        device=name,
        cpus=os.cpu_count(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        date=time.strftime("%Y-%m-%d"),
    )


def make_data(
    dst: str, images: int, size: tuple[int, int], classes: int, val_fraction: float = 0.1, workers: int = 0
) -> None:
    """An ImageFolder tree of photo-like JPEGs (realistic file sizes) for throughput runs, synthesized by
    ``workers`` processes (0: one per CPU). Each picture is seeded by its index, so the tree is the same for any
    number of workers. One picture takes 60-90 ms: on one core 4,505 of them took 262 s of the first GPU session."""
    root = Path(dst)
    n_val = max(classes, int(images * val_fraction))
    total = images + n_val
    for i in range(min(total, classes)):
        for split in ("train", "validation"):
            (root / split / f"class_{i:03d}").mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, total)
    chunks = [range(start, total, workers) for start in range(workers)]
    job = functools.partial(save_photos, str(root), images, classes, size)
    if workers == 1:
        job(chunks[0])
    else:  # spawn: the caller may hold CUDA or Ray threads that a fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(job, chunks))
    print(json.dumps(dict(made=str(root), train=images, validation=n_val, size=list(size), classes=classes)))


def bench_config(data_dir: str, dataset: str, path: str, overrides: Sequence[str]):
    args = build_parser().parse_args(["train", *overrides])
    cfg = Config().update({"dataset": dataset, "data_dir": data_dir}).update(overrides_of(args))
    cfg.update(
        {"gpu_decode": path == "gpu", "data_on_device": path == "device", "loader": "ray" if path == "ray" else "torch"}
    )
    return cfg.validate()


def bench_loader(cfg, device: str, batches: int) -> dict:
    """img/s of iterating this rank's training loader (world size 1) into normalised batches on ``device``."""
    import torch

    source = build_source(cfg)
    data_config = resolve_data_config(cfg, cfg.model.num_classes or source.num_classes)
    loaders = build_loaders(cfg, source, data_config, rank=0, world_size=1, device=torch.device(device))
    it = _batches_across_epochs(loaders)
    # Start-up is not throughput, and the batches the loader processes prefetched meanwhile would flatter it.
    for _ in range(1 + 2 * cfg.data.workers):
        next(it)
    count, start = 0, time.perf_counter()
    for x, _ in it:
        x = x.to(device, non_blocking=True)
        count += x.shape[0]
        if count >= batches * cfg.data.batch_size:
            break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return dict(
        img_per_sec=round(count / elapsed, 1), images=count, seconds=round(elapsed, 2), bad=loaders.train.bad.count
    )


def _batches_across_epochs(loaders):
    """The training loader's batches, epoch after epoch: a benchmark may want more batches than one epoch holds
    (a warm-up of 1 + 2 x 16 loader processes' prefetch is 33 batches, more than 4,096 images make at -b 256).
    Every epoch yields: build_loaders refuses a training set smaller than one batch."""
    epoch = 0
    while True:
        loaders.set_epoch(epoch)
        yield from loaders.train
        epoch += 1


def bench_train(cfg, epochs: int = 2) -> dict:
    """Ray Train epochs; the last epoch's training img/s (all workers) as the run itself reports it. The first
    epoch also pays for cuDNN's autotuning and torch's first-step work, so from 2 epochs on the last one is the
    steady state (each epoch still waits for its loader processes' first batches, as every real epoch does)."""
    with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-") as out:
        cfg.update(
            {
                "output": out,
                "experiment": f"bench-{int(time.time())}",
                "epochs": epochs,
                "warmup_epochs": 0,
                "cooldown_epochs": 0,
            }
        )
        result = train(cfg, echo=lambda *_: None)
    m = result["last_metrics"]
    return dict(
        img_per_sec=round(m["img_per_sec"], 1),
        epochs=epochs,
        train_samples=m["train_samples"],
        train_seconds=round(m["train_time"], 2),
        bad=m.get("train_bad_samples", 0),
    )
