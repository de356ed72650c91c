"""`raytrain-cls bench tta`: time to accuracy. A real training run (a recipe and any train flags), with the wall
clock of every evaluated epoch measured from this command's process start (Ray's start included) and from the
run's first training step.

Issue 8's Fashion-MNIST targets read off it directly: top-1 >= 93.5 % within 20 s of the first step and <= 60 s
from command start (timm's train.py: 84.5 s), and a recipe reaching 95.0 % within 5 minutes.

The clock is a Ray Train callback: it runs in the Train controller when rank 0 reports an epoch (after that
epoch's evaluation and checkpoint) and appends the time to a JSON-lines file in the run directory
(``tta.jsonl``, so the numbers stay with the run). One JSON line per epoch is printed, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ray.train import UserCallback

from raytrain_cls.bench.common import environment, print_table
from raytrain_cls.commands.cli import base_recipe, build_parser, overrides_of
from raytrain_cls.core.config import load_config
from raytrain_cls.core.storage import is_uri
from raytrain_cls.run.driver import fit_run, run_paths
from raytrain_cls.run.startup import process_start

TTA_FILE = "tta.jsonl"


class EpochClock(UserCallback):
    """Appends {epoch, metric value, wall-clock time} per evaluated epoch to ``path`` (on the controller's node)."""

    def __init__(self, path: str, metric: str):
        self.path, self.metric = path, metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or metrics[0].get("recovery") or self.metric not in metrics[0]:
            return
        row = dict(epoch=int(metrics[0]["epoch"]), value=float(metrics[0][self.metric]), at=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def time_to_accuracy(rows: list[dict], start: float, first_step: Optional[float], target: Optional[float]) -> dict:
    """Per epoch: seconds from ``start`` and from ``first_step``; and the first epoch at or over ``target``."""
    epochs = [
        dict(
            epoch=r["epoch"],
            top1=round(r["value"], 3),
            s_from_start=round(r["at"] - start, 2),
            s_from_first_step=None if first_step is None else round(r["at"] - first_step, 2),
        )
        for r in rows
    ]
    reached = next((e for e in epochs if target is not None and e["top1"] >= target), None)
    return dict(epochs=epochs, target=target, reached=reached)


def run(recipe: Optional[str], overrides: Sequence[str], target: Optional[float]) -> dict:
    stamps = {"process": process_start(command=True), "driver": time.time()}
    args = build_parser().parse_args(["train", *(["-c", recipe] if recipe else []), *overrides])
    cfg = load_config(base_recipe(args), overrides_of(args))  # exactly what `raytrain-cls train` would run
    paths = run_paths(cfg)
    if is_uri(paths.run_dir):
        raise SystemExit("bench tta keeps its clock file in a local run directory: use a local --output")
    Path(paths.run_dir).mkdir(parents=True, exist_ok=True)
    clock_file = str(Path(paths.run_dir) / TTA_FILE)
    metric = f"eval_{cfg.checkpoint.eval_metric}"
    payload = fit_run(cfg, paths, extra_callbacks=[EpochClock(clock_file, metric)], stamps=stamps)
    rows = [json.loads(line) for line in Path(clock_file).read_text().splitlines()]
    worker_stamps = payload["last_metrics"].get("startup") or {}
    start = stamps["process"] or stamps["driver"]
    result = time_to_accuracy(rows, start, worker_stamps.get("first_step"), target)
    result.update(
        run_dir=paths.run_dir,
        model=cfg.model.model,
        dataset=cfg.data.dataset,
        startup_s=payload["startup"]["total_s"],
        best=payload["best_value"],
    )
    return result


def run_command(recipe: str, overrides: Sequence[str], target: Optional[float], timeout: float = 1800) -> dict:
    """`raytrain-cls bench tta` in a process of its own, as a user runs it (its clock starts with that process,
    imports and ray.init included); returns its summary line. A Ray this process started is shut down first,
    so the command starts its own, as it would alone."""
    import subprocess
    import sys

    import ray

    if ray.is_initialized():
        ray.shutdown()
    cmd = [
        sys.executable,
        "-m",
        "raytrain_cls",
        "bench",
        "tta",
        "-c",
        recipe,
        *([] if target is None else ["--target", str(target)]),
        "--",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = next((line for line in reversed(lines) if "target" in line), None)
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"bench tta exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    summary["epochs"] = [line for line in lines if "epoch" in line and "target" not in line]
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("tta", help="time to accuracy: every epoch's top-1 against the wall clock from command start")
    p.add_argument("-c", "--config", default=None, help="a recipe name or YAML file (as in train)")
    p.add_argument("--target", type=float, default=None, help="report the first epoch at or above this top-1")
    p.add_argument("overrides", nargs="*", help="train flags after --, e.g. -- --use-gpu --epochs 10")


def main(args: argparse.Namespace) -> int:
    import torch

    result = run(args.config, args.overrides, args.target)
    for epoch in result["epochs"]:
        print(json.dumps(dict(bench="tta", **epoch)), flush=True)
    summary = {k: v for k, v in result.items() if k != "epochs"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(dict(bench="tta", **summary, **environment(device)), default=str), flush=True)
    reached = result["reached"]
    verdict = (
        "no target"
        if result["target"] is None
        else f"target {result['target']:g} "
        + (
            f"reached at epoch {reached['epoch']}, {reached['s_from_start']:g} s from start"
            if reached
            else "not reached"
        )
    )
    print_table(f"bench tta: {verdict}", result["epochs"], ("epoch", "top1", "s_from_start", "s_from_first_step"))
    return 0
