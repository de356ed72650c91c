"""`raytrain-cls bench step`: the training step's img/s in a bare PyTorch loop and in raytrain-cls's per-worker
loop under a 1-worker TorchTrainer, measured side by side by one command, eager and (--compile) compiled.

Issue 8's target is a Ray-hosted step at >= 0.98x the bare loop. Both sides build the same model, optimizer and
loss from the same config (timm's create_model / create_optimizer_v2), with the same autocast and memory format:

* bare: one random batch already on the device, ``steps`` timed steps after ``warmup`` untimed ones, a device
  sync at each end. Nothing else: no data, no logging, no checkpoint.
* hosted: ``raytrain-cls train`` on the synthetic data set kept on the device (--data-on-device --no-aug: a
  batch is a gather and one resize-normalise of same-size images), two epochs of at least ``steps`` steps; the
  second epoch's img/s as the run reports it. It pays for all the product does per step (the NaN watch, the
  LR schedule, the input gather) and, at each epoch end, for nothing timed (evaluation and the checkpoint come
  after the epoch's clock stops).

On CPU devices the bare loop runs with as many threads as a Ray worker gets (its CPUs), so both sides use the
same cores. Each result is a JSON line; the pair's ratio comes with the second.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch

from raytrain_cls.bench.common import bench_config, bench_train, environment, print_table
from raytrain_cls.core.engine import amp_parts
from raytrain_cls.core.loss import build_train_loss
from raytrain_cls.core.model import build_model, compile_model
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.run.preflight import resolve_data_config


def step_config(overrides: Sequence[str], steps: int, compiled: bool):
    """The hosted run's config (and the bare loop's model/optimizer/loss settings)."""
    cfg = bench_config(None, "synthetic", "device", overrides)
    batches = min(steps, 16)  # distinct batches held on the device; epochs repeat them to reach `steps`
    samples = cfg.data.batch_size * max(1, cfg.scaling.num_workers or 1) * batches
    cfg.update(
        {
            "no_aug": True,
            "synthetic_samples": samples,
            "epoch_repeats": max(1.0, steps / batches),
            "num_workers": 1,
            "log_interval": 10**6,
            "checkpoint_hist": 1,
        }
    )
    if compiled:
        cfg.update({"torchcompile": cfg.model.torchcompile or "inductor"})
    return cfg.validate()


def bare_loop(cfg, device: torch.device, steps: int, warmup: int) -> dict:
    """img/s of fwd + bwd + optimizer step on one fixed batch on ``device``; nothing else in the loop."""
    num_classes = cfg.model.num_classes or 1000
    input_size = resolve_data_config(cfg, num_classes)["input_size"]
    model = build_model(cfg, num_classes, device)
    optimizer = build_optimizer(cfg, model)
    train_model = compile_model(cfg, model)
    loss_fn = build_train_loss(cfg).to(device)
    autocast, scaler = amp_parts(cfg.precision, device)
    batch = cfg.data.batch_size
    x = torch.randn(batch, *input_size, device=device)
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        with autocast():
            loss = loss_fn(train_model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    return dict(img_per_sec=round(steps * batch / elapsed, 1), steps=steps, seconds=round(elapsed, 2))


def measure(overrides: Sequence[str], device: str, steps: int, warmup: int, compiled: bool) -> list[dict]:
    cfg = step_config(overrides, steps, compiled)
    dev = torch.device(device)
    if dev.type == "cuda":
        cfg.update({"use_gpu": True})
    mode = "compiled" if compiled else "eager"
    common = dict(
        bench="step",
        mode=mode,
        model=cfg.model.model,
        batch_size=cfg.data.batch_size,
        amp=cfg.precision.amp and cfg.precision.amp_dtype,
        channels_last=cfg.model.channels_last,
    )
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # a Ray worker runs torch with as many threads as it has CPUs
        torch.set_num_threads(max(1, int((cfg.scaling.resources_per_worker or {}).get("CPU", 1))))
    try:
        bare = dict(common, side="bare", **bare_loop(cfg, dev, steps, warmup))
    finally:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the bare loop's model is gone; the hosted run's worker shares this GPU
    print(json.dumps(bare), flush=True)
    hosted = dict(common, side="hosted", **bench_train(cfg), **environment(device))
    hosted["ratio_to_bare"] = round(hosted["img_per_sec"] / bare["img_per_sec"], 3)
    print(json.dumps(hosted), flush=True)

    print_table(
        "bench step",
        [bare, hosted],
        ("side", "mode", "model", "batch_size", "amp", "img_per_sec", "ratio_to_bare", "device"),
    )
    return [bare, hosted]


def add_parser(sub) -> None:
    p = sub.add_parser("step", help="train-step img/s: a bare PyTorch loop vs the Ray-hosted per-worker loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100, help="timed steps (bare) / at least this many per epoch")
    p.add_argument("--warmup", type=int, default=10, help="untimed bare-loop steps first")
    p.add_argument("--compile", action="store_true", help="also the pair with torch.compile (inductor)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="train flags after --, e.g. -- --model resnet50 -b 256 --amp --amp-dtype bfloat16 --channels-last",
    )


def main(args: argparse.Namespace) -> int:
    for compiled in (False, True) if args.compile else (False,):
        measure(args.overrides, args.device, args.steps, args.warmup, compiled)
    return 0
