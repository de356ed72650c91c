"""`raytrain-cls bench checkpoint`: what a checkpoint costs to write, to verify and to load, and the share of it
that the checksums take (every file's sha256 is recorded when written and checked before anything loads).

    raytrain-cls bench checkpoint --model resnet50 --optimizer sgd --ema

One JSON line per repeat, then a table. The model is built with random weights (nothing is downloaded); the
optimizer state is filled by one step, so state.pt has its real size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

from raytrain_cls.bench.common import environment, print_table
from raytrain_cls.core.config import Config
from raytrain_cls.core.model import build_ema, check_model_name
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.core.state import META_FILE, TrainState, file_digest, verified_meta


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint write / verify / load seconds, and the checksums' share")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optimizer", default="sgd", help="timm optimizer name (its state is part of state.pt)")
    p.add_argument("--ema", action="store_true", help="with EMA weights (a third file)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder; use the run's disk)")


def measure(model_name: str, num_classes: int, optimizer: str, ema: bool, directory: Path) -> dict:
    cfg = Config().update({"model": model_name, "opt": optimizer, "model_ema": ema, "dataset": "digits"})
    model = timm.create_model(model_name, num_classes=num_classes)
    opt = build_optimizer(cfg, model)
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # one step: the optimizer's buffers exist and are full size
    opt.step()
    state = TrainState(cfg.to_dict(), model, opt, ema=build_ema(cfg, model))
    started = time.perf_counter()
    state.save(directory)
    save_s = time.perf_counter() - started
    files = json.loads((directory / META_FILE).read_text())["files"]
    started = time.perf_counter()
    for name in files:
        file_digest(directory / name)
    hash_s = time.perf_counter() - started
    started = time.perf_counter()
    verified_meta(directory)
    verify_s = time.perf_counter() - started
    started = time.perf_counter()
    state.load(directory)  # verifies again, then loads
    load_s = time.perf_counter() - started
    total = sum(f["bytes"] for f in files.values())
    return dict(
        bench="checkpoint",
        model=model_name,
        optimizer=optimizer,
        ema=ema,
        mbytes=round(total / 1e6, 1),
        files={name: round(f["bytes"] / 1e6, 1) for name, f in files.items()},
        save_s=round(save_s, 3),
        hash_s=round(hash_s, 3),
        hash_share_of_save=round(hash_s / save_s, 3),
        verify_s=round(verify_s, 3),
        load_s=round(load_s, 3),
        hash_mb_per_s=round(total / 1e6 / hash_s, 1),
    )


def main(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-ckpt-", dir=args.dir) as tmp:
            row = measure(args.model, args.num_classes, args.optimizer, args.ema, Path(tmp) / "ckpt")
        rows.append(row)
        print(json.dumps({**row, **environment("cpu")}, default=str), flush=True)
    print_table(
        f"bench checkpoint: {args.model}",
        rows,
        ("mbytes", "save_s", "hash_s", "hash_share_of_save", "verify_s", "load_s", "hash_mb_per_s"),
    )
    return 0
