"""Benchmarks of the input paths on the same data (commands that print numbers; never timed tests).

    raytrain-cls bench make-data /data/bench-jpegs --images 4096 --size 500x375
    raytrain-cls prepare /data/bench-jpegs /data/bench-shards
    raytrain-cls bench loader --data-dir /data/bench-shards --paths torch,gpu -b 256 -j 16 --device cuda
    raytrain-cls bench train --data-dir /data/bench-shards --paths torch,gpu,ray --model resnet50 \\
        -- --amp --amp-dtype bfloat16 --channels-last --use-gpu -b 256 -j 16
    python -m raytrain_cls bench gpu-checks $OUT --device cuda      # all of issue 4's GPU measurements at once

``loader`` times this process iterating the training loader of each path (the DataLoader with timm's CPU
transforms, or the --gpu-decode path ending in normalised batches on --device); ``train`` runs two real epochs
per path through Ray Train and reports the second one's training img/s (the first pays for start-up). Every
result is one JSON line, with the device and versions, for the benchmark doc (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from raytrain_cls.bench import checkpoint, decode, recipes, resize, startup, step, trials, tta
from raytrain_cls.bench.common import (
    PATHS,
    bench_config,
    bench_loader,
    bench_train,
    environment,
    make_data,
    print_table,
)
from raytrain_cls.core.datasets import NAMES as DATASET_NAMES
from raytrain_cls.data.prepare import prepare

# issue 4's three, issue 8's step pair and time to accuracy, then issue 27's training variants and start-up
CHECKS = ("decode", "loader", "train", "step", "tta", "recipe", "startup")
DEFAULT_CHECKS = ("decode", "loader", "train")
TTA_RECIPE = str(Path(__file__).resolve().parents[2] / "jobs" / "fashion_mnist_fast.yaml")  # in the checkout


def gpu_checks(
    out: str,
    device: str,
    images: int,
    size: tuple[int, int],
    batch_size: int,
    workers: int,
    model: str,
    only: Sequence[str] = DEFAULT_CHECKS,
    train_steps: int = 100,
    work_dir: Optional[str] = None,
    fm_dir: Optional[str] = None,
    tta_overrides: Sequence[str] = (),
) -> list[dict]:
    """Everything issue 4 asks a GPU machine to measure, as one command: device decode parity and throughput,
    loader img/s per path, and two Ray Train epochs per path (the second one's img/s counts), each of at least
    ``train_steps`` steps (passes over the data are repeated to get there); and on request issue 8's bare vs
    Ray-hosted step pair (``step``, bench/step.py) and the Fashion-MNIST time to accuracy (``tta``,
    bench/tta.py, on jobs/fashion_mnist_fast.yaml with the IDX files in ``fm_dir``), and issue 27's training
    variants of that recipe (``recipe``: bf16, fp16, resume, compile, sync-BN, local mode; bench/recipes.py) and
    its start-up against a bare script's (``startup``, bench/startup.py). Each step's result (or its
    error) is appended to OUT/gpu-checks.jsonl as soon as it exists, so a run cut short still leaves what it
    measured. The JPEGs, shards and runs (~600 MB at the defaults) go to ``work_dir``, by default a temporary
    folder removed at the end: OUT holds only the results (on the GPU machines, everything under $OUT is
    shipped back)."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="raytrain-cls-gpu-checks-") as tmp:
            return gpu_checks(
                out, device, images, size, batch_size, workers, model, only, train_steps, tmp, fm_dir, tta_overrides
            )
    results: list[dict] = []
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu-checks.jsonl"

    def record(step: str, run) -> None:
        start = time.perf_counter()
        try:
            row = dict(step=step, ok=True, **run())
        except Exception as e:  # keep going: the other steps' numbers are still worth having
            row = dict(step=step, ok=False, error=f"{type(e).__name__}: {e}")
        row["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)

    record("environment", lambda: environment(device))
    if "decode" in only:
        record(
            "decode",
            lambda: decode.main(
                [
                    "--images",
                    str(images),
                    "--size",
                    f"{size[0]}x{size[1]}",
                    "--batch-size",
                    str(batch_size),
                    "-j",
                    str(workers),
                    "--device",
                    device,
                    "--unique",
                    str(min(images, 256)),
                ]
            ),
        )
    data, shards = Path(work_dir) / "jpegs", Path(work_dir) / "shards"
    if {"loader", "train"} & set(only):

        def make_shards() -> dict:
            make_data(str(data), images, size, classes=10, workers=workers)
            manifest = prepare(str(data), str(shards), workers=workers, log=lambda *a, **k: None)
            return dict(train=manifest.splits["train"].num_samples, shards=str(shards))

        record("data", make_shards)
        if not results[-1]["ok"]:
            return results
    overrides = ["-b", str(batch_size), "-j", str(workers), "--model", model]
    if "loader" in only:
        for path in ("torch", "gpu"):
            record(
                f"loader-{path}",
                lambda path=path: bench_loader(
                    bench_config(str(shards), "parquet", path, overrides),
                    device,
                    batches=max(2, images // batch_size // 2),
                ),
            )
    if "train" in only:
        gpu = (
            ["--use-gpu", "--num-workers", "1", "--amp", "--amp-dtype", "bfloat16", "--channels-last"]
            if device.startswith("cuda")
            else ["--num-workers", "1"]
        )
        repeats = train_steps * batch_size / images
        if repeats > 1:  # 4,096 images at -b 256 are 16 steps: too short an epoch to time
            gpu += ["--epoch-repeats", f"{repeats:.4g}"]
        for path in ("torch", "gpu"):
            record(
                f"train-{path}",
                lambda path=path: bench_train(bench_config(str(shards), "parquet", path, overrides + gpu)),
            )
    cuda = device.startswith("cuda")
    if "step" in only:
        flags = ["--model", model, "-b", str(batch_size)]
        flags += ["--amp", "--amp-dtype", "bfloat16", "--channels-last"] if cuda else []

        def step_pair() -> dict:
            bare, hosted = step.measure(flags, device, train_steps, warmup=10, compiled=False)
            return dict(
                bare_img_per_sec=bare["img_per_sec"],
                hosted_img_per_sec=hosted["img_per_sec"],
                ratio=hosted["ratio_to_bare"],
                model=model,
                batch_size=batch_size,
            )

        record("step-eager", step_pair)
    if "tta" in only:
        flags = [
            *(["--data-dir", fm_dir] if fm_dir else []),
            "--output",
            str(Path(work_dir) / "runs"),
            "--experiment",
            "tta",
            *([] if cuda else ["--no-use-gpu"]),
            *tta_overrides,
        ]
        record("tta", lambda: tta.run_command(TTA_RECIPE, flags, target=93.5))
    recipe_flags = [*(["--data-dir", fm_dir] if fm_dir else []), *([] if cuda else ["--no-use-gpu"]), *tta_overrides]
    if {"recipe", "startup"} & set(only) and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # the train steps' Ray: each command below starts its own, as it would alone
    if "recipe" in only:
        runs = str(Path(work_dir) / "recipe-runs")
        for variant in recipes.GPU_VARIANTS:
            record(
                f"recipe-{variant.name}",
                lambda variant=variant: recipes.run_variant(TTA_RECIPE, variant, recipe_flags, runs),
            )
    if "startup" in only:  # the recipe's data held by the loader: the bare script has no --data-on-device path
        record("startup", lambda: startup.run_command(TTA_RECIPE, [*recipe_flags, "--no-data-on-device"]))
    return results


ALIASES = {"loader": "data", "train": "e2e"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raytrain-cls bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    mk = sub.add_parser("make-data", help="an ImageFolder of photo-like JPEGs")
    mk.add_argument("dst")
    mk.add_argument("--images", type=int, default=4096)
    mk.add_argument("--size", default="500x375", help="WxH")
    mk.add_argument("--classes", type=int, default=10)
    mk.add_argument("-j", "--workers", type=int, default=0, help="processes synthesizing pictures (0: one per CPU)")
    gc = sub.add_parser("gpu-checks", help="decode parity + loader + train benchmarks in one go (JSON lines)")
    gc.add_argument("out", help="folder for the data and gpu-checks.jsonl")
    gc.add_argument("--device", default="cuda")
    gc.add_argument("--images", type=int, default=4096)
    gc.add_argument("--size", default="500x375", help="WxH")
    gc.add_argument("-b", "--batch-size", type=int, default=256)
    gc.add_argument("-j", "--workers", type=int, default=8)
    gc.add_argument("--model", default="resnet50")
    gc.add_argument("--only", default=",".join(DEFAULT_CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    gc.add_argument("--fm-dir", default=None, help="tta: the Fashion-MNIST IDX files (default: the Debian package's)")
    gc.add_argument(
        "--tta-flags",
        default="",
        help="tta, recipe, startup: extra train flags for the Fashion-MNIST recipe, e.g. '--epochs 2'",
    )
    gc.add_argument("--train-steps", type=int, default=100, help="at least this many steps per timed epoch")
    gc.add_argument("--work-dir", default=None, help="folder for the JPEGs and shards (default: a temporary one)")
    step.add_parser(sub)
    tta.add_parser(sub)
    checkpoint.add_parser(sub)
    startup.add_parser(sub)
    trials.add_parser(sub)
    resize.add_parser(sub)
    for name, alias in ALIASES.items():  # the names issue #8 uses work too
        b = sub.add_parser(
            name, aliases=[alias], help=f"{name} img/s of each input path on the same data (also: {alias})"
        )
        b.add_argument("--data-dir", default=None, help="the data (parquet, folder; optional for the built-in sets)")
        b.add_argument("--dataset", default="parquet", choices=DATASET_NAMES)
        b.add_argument("--paths", default="torch,gpu" if name == "loader" else "torch,gpu,ray")
        b.add_argument("overrides", nargs="*", help="train flags after --, e.g. -- -b 256 -j 16 --model resnet50")
        if name == "loader":
            b.add_argument("--device", default="cpu")
            b.add_argument("--batches", type=int, default=20)
    args = p.parse_args(argv)
    args.what = {alias: name for name, alias in ALIASES.items()}.get(args.what, args.what)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.what == "make-data":
        w, h = (int(v) for v in args.size.lower().split("x"))
        make_data(args.dst, args.images, (w, h), args.classes, workers=args.workers)
        return 0
    own_mains = {
        "step": step.main,
        "tta": tta.main,
        "checkpoint": checkpoint.main,
        "startup": startup.main,
        "trials": trials.main,
        "resize": resize.main,
    }
    if args.what in own_mains:
        return own_mains[args.what](args)
    if args.what == "gpu-checks":
        w, h = (int(v) for v in args.size.lower().split("x"))
        only = [c for c in args.only.split(",") if c]
        unknown = sorted(set(only) - set(CHECKS))
        if unknown:
            raise SystemExit(f"unknown checks {unknown}: choose from {list(CHECKS)}")
        rows = gpu_checks(
            args.out,
            args.device,
            args.images,
            (w, h),
            args.batch_size,
            args.workers,
            args.model,
            only,
            args.train_steps,
            args.work_dir,
            args.fm_dir,
            args.tta_flags.split(),
        )
        print_table(
            "bench gpu-checks",
            rows,
            (
                "step",
                "ok",
                "img_per_sec",
                "ratio_to_bare",
                "reached",
                "top1",
                "ratio",
                "local_ratio",
                "wall_s",
                "error",
            ),
        )
        return 0 if all(r["ok"] for r in rows) else 1
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"unknown paths {unknown}: choose from {list(PATHS)}")
    if args.what == "loader" and "ray" in paths:
        raise SystemExit("the Ray Data path runs inside Ray Train: measure it with `bench train --paths ray`")
    rows = []
    for path in paths:
        cfg = bench_config(args.data_dir, args.dataset, path, args.overrides)
        if args.what == "loader":
            numbers = bench_loader(cfg, args.device, args.batches)
            env = environment(args.device)
        else:
            numbers = bench_train(cfg)
            env = environment("cuda" if cfg.resolved.use_gpu else "cpu")
        row = dict(
            bench=args.what,
            path=path,
            model=cfg.model.model,
            batch_size=cfg.data.batch_size,
            loader_workers=cfg.data.workers,
            **numbers,
            **env,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(
        f"bench {args.what}",
        rows,
        (
            "path",
            "model",
            "batch_size",
            "loader_workers",
            "img_per_sec",
            "images",
            "seconds",
            "bad",
            "epochs",
            "device",
            "date",
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
