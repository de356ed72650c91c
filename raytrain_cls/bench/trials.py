"""`raytrain-cls bench trials`: what a Tune trial costs before it trains, trials as Ray Train runs vs --in-process.

    raytrain-cls bench trials [-c RECIPE] [--trials 4] [--repeats 1] [-- TRAIN FLAGS]

Each repeat runs the same search twice, each a `raytrain-cls tune` process of its own, one after the other: its
trials as Ray Train runs (the default), then `--in-process` (run/trial_process.py). The search is ``--trials``
one-epoch trials that differ in their LR only (a grid), one at a time (FIFO), so that nothing overlaps the gaps.
It runs on the cluster RAY_ADDRESS names when it is set, else on a fresh private local Ray.

Two figures per trial, from the trial run directories:
* startup_s: the trial's process taking the trial to its first training step (trials.csv; issue 26's target for
  a trial's fixed cost is <= 5 s on a running cluster);
* gap_s: the previous trial's result.json written to this trial's first step, everything between two trials
  (Tune's own bookkeeping and process hand-over included), for every trial but the first.
One JSON line per search, then a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_S = 5.0  # issue 26: a Tune trial's fixed cost (trial start to its first step) on a running cluster
MODES = {"ray-train": [], "in-process": ["--in-process"]}


def add_parser(sub) -> None:
    p = sub.add_parser("trials", help="a Tune trial's fixed cost: trials as Ray Train runs vs --in-process")
    p.add_argument("-c", "--config", default=None, help="a recipe name or YAML file (as in tune)")
    p.add_argument("--trials", type=int, default=4, help="one-epoch trials per search, one at a time (default 4)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="training flags after --, e.g. -- --model resnet18 -b 64")


def lr_grid(trials: int) -> str:
    """``trials`` distinct LRs, all of them trainable (0.01 .. 0.1)."""
    return "lr=grid:" + ",".join(f"{0.01 + 0.09 * i / max(trials - 1, 1):.4g}" for i in range(trials))


def trial_figures(search_dir: Path) -> list[dict]:
    """Per trial, in the order they ran: its startup_s, and the gap since the previous trial's result.json."""
    with (search_dir / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    trials = []
    for row in rows:
        result_file = search_dir / "trials" / f"trial-{row['trial_id']}" / "result.json"
        result = json.loads(result_file.read_text())
        first_step = (result["last_metrics"].get("startup") or {}).get("first_step")
        trials.append(
            dict(
                startup_s=float(row["startup_s"]) if row["startup_s"] else None,
                first_step=first_step,
                ended=result_file.stat().st_mtime,
            )
        )
    trials.sort(key=lambda t: t["first_step"] or 0)
    for previous, trial in zip(trials, trials[1:]):
        trial["gap_s"] = round(trial["first_step"] - previous["ended"], 2) if trial["first_step"] else None
    return trials


def run_search(mode: str, argv: Sequence[str], trials: int, output: str) -> dict:
    """One search in a `raytrain-cls tune` process of its own; its wall time and per-trial figures."""
    cmd = [
        sys.executable, "-m", "raytrain_cls", "tune", *argv, "--epochs", "1", "--search", lr_grid(trials),
        "--num-samples", "1", "--scheduler", "fifo", "--max-concurrent-trials", "1", *MODES[mode],
        "--output", output, "--experiment", mode,
    ]  # fmt: skip
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"raytrain-cls tune ({mode}) exited {proc.returncode}: {proc.stderr[-1500:]}")
    figures = trial_figures(Path(output) / mode)
    startups = [t["startup_s"] for t in figures if t["startup_s"] is not None]
    gaps = [t["gap_s"] for t in figures if t.get("gap_s") is not None]
    median_startup = statistics.median(startups) if startups else None
    return dict(
        mode=mode,
        trials=len(figures),
        search_s=round(wall, 1),
        startup_s=startups,
        startup_median_s=median_startup,
        gap_s=gaps,
        gap_median_s=statistics.median(gaps) if gaps else None,
        target_s=TARGET_S,
        ok=median_startup is not None and median_startup <= TARGET_S,
    )


def main(args: argparse.Namespace) -> int:
    from raytrain_cls.bench.common import environment, print_table

    argv = [*(["-c", args.config] if args.config else []), *args.overrides]
    rows = []
    for repeat in range(args.repeats):
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-trials-") as out:
                row = dict(
                    bench="trials",
                    repeat=repeat,
                    cluster=os.environ.get("RAY_ADDRESS") or "fresh local Ray",
                    **run_search(mode, argv, args.trials, out),
                )
            rows.append(row)
            print(json.dumps({**row, **environment("cpu")}, default=str), flush=True)
    print_table(
        "bench trials: a Tune trial's start to its first step (startup_s), and the gap between two trials",
        rows,
        ("repeat", "mode", "trials", "search_s", "startup_median_s", "gap_median_s", "ok"),
    )
    return 0
