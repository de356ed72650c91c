"""`bench resize`: what a resize of an elastic run costs, on a private two-node local cluster, and the same recipe
trained at a fixed size beside it.

The cluster is made with this checkout's cluster/local scripts: a head with one CPU, and a second one-CPU node
added and removed by the bench. The elastic run (--num-workers 1:2) starts on one worker. Once it has trained an
epoch, the second node joins: Ray grows the run to two workers. Once it has trained an epoch on two, the node gets
a preemption notice (drain.sh) and is killed (stop.sh --kill): the run shrinks to one worker and finishes. Then
the same recipe trains on both nodes at the fixed size (--num-workers 2), unless --no-fixed-run.

Printed: the seconds from each resource change to training again (the node joined / the node killed, to the
restarted group's "Resumed from" line, which comes just before its first step), and per epoch of both runs the
worker counts, accumulation steps, global batch, samples trained, LR and top-1. --json writes it all. Every
process the bench starts is stopped by its own pid (stop.sh), whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from raytrain_cls.bench.common import environment, print_table
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.state import read_meta
from raytrain_cls.run.checkpointer import checkpoint_name
from raytrain_cls.run.report import SUMMARY_FILE, read_summary

CHECKOUT = Path(__file__).resolve().parents[2]
LOCAL = CHECKOUT / "cluster" / "local"
RECIPE = CHECKOUT / "jobs" / "digits_smoke.yaml"


class ResizeBenchError(UserError, RuntimeError):
    """A step of the bench that did not happen (the script, the run or the event named; the logs say more)."""


EPOCH_COLUMNS = ("run", "epoch", "workers", "grad_accum", "global_batch", "train_samples", "lr", "eval_top1")


def add_parser(sub) -> None:
    p = sub.add_parser("resize", help="an elastic run's resize cost on a private 2-node local cluster")
    p.add_argument("--output", default="output/bench-resize", help="where the two runs go")
    p.add_argument("--epochs", type=int, default=16, help="epochs of each run (enough for both resizes)")
    p.add_argument("--port", type=int, default=6393, help="the private cluster's GCS port (and +1900: dashboard)")
    p.add_argument("--worker-base-port", type=int, default=6800, help="the second node's first port")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=15.0,
        help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S: how long a group start waits for a node Ray still counts",
    )
    p.add_argument(
        "--fixed-run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the recipe at the fixed size, to compare with (--no-fixed-run: the elastic run alone)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("overrides", nargs="*", help="more train flags after --, for both runs")


class Driver:
    """A `raytrain-cls train` process whose output lines are kept with their arrival times (and logged)."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raytrain_cls", "train", *argv],
            cwd=CHECKOUT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.log.open("w") as out:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                out.write(line)
                out.flush()

    def wait_for(self, text: str, after: float, timeout: float) -> float:
        """The arrival time of the first line after ``after`` that contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for arrived, line in list(self.lines):
                if arrived > after and text in line:
                    return arrived
            if self.proc.poll() is not None and not self.reader.is_alive():
                raise ResizeBenchError(f"the run ended before {text!r} (see {self.log})")
            time.sleep(0.1)
        raise ResizeBenchError(f"no {text!r} within {timeout:.0f} s (see {self.log})")

    def line_after(self, pattern: str, after: float) -> Optional[str]:
        """The first line after ``after`` that matches, without Ray's colour codes."""
        found = next((line for arrived, line in self.lines if arrived > after and re.search(pattern, line)), None)
        return re.sub(r"\x1b\[[0-9;]*m", "", found) if found is not None else None

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(timeout=10)


class LocalCluster:
    """The bench's own head and second node, through cluster/local (stopped by their pids at the end)."""

    def __init__(self, port: int, worker_base: int):
        self.port, self.worker_base = port, worker_base
        # The scripts run `ray` from this Python's environment, activated or not.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
        self.env.pop("RAY_ADDRESS", None)  # never a cluster the caller's shell points at

    def script(self, name: str, *args: str, timeout: float = 180) -> None:
        cmd = ["bash", str(LOCAL / name), "--port", str(self.port), *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ResizeBenchError(f"{' '.join(cmd[1:])} failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        self.script("start-head.sh", "--dashboard-port", str(self.port + 1900), "--num-cpus", "1")

    def add_node(self) -> float:
        self.script("add-worker.sh", "--name", "w1", "--num-cpus", "1", "--base-port", str(self.worker_base))
        return time.monotonic()

    def preempt_node(self) -> None:
        self.script("drain.sh", "--node", "w1", "--deadline", "60")

    def kill_node(self) -> float:
        self.script("stop.sh", "--node", "w1", "--kill")
        return time.monotonic()

    def stop(self) -> None:
        try:
            self.script("stop.sh", timeout=240)
        except (ResizeBenchError, subprocess.TimeoutExpired) as e:
            print(f"bench resize: stopping the cluster: {e}", file=sys.stderr)


def train_argv(args: argparse.Namespace, workers: str, experiment: str) -> list[str]:
    flags = ["-c", str(RECIPE), "--num-workers", workers, "--epochs", str(args.epochs), "--checkpoint-hist", "1000"]
    flags += ["--output", str(Path(args.output).resolve()), "--experiment", experiment, "--progress", "lines"]
    if ":" in workers:
        flags += ["--elastic-resize-interval", "2", "--preemption-check-interval", "2"]
    return flags + list(args.overrides)


def elastic_run(args: argparse.Namespace, cluster: LocalCluster, env: dict, out: Path) -> dict:
    """The elastic run through a grow and a shrink; the seconds each one cost."""
    driver = Driver(train_argv(args, "1:2", "elastic"), env, out / "elastic.log")
    try:
        started = driver.wait_for("1 training worker(s)", 0, 300)
        driver.wait_for("Epoch 0/", started, 300)
        joined = cluster.add_node()
        grown_group = driver.wait_for("2 training worker(s)", joined, 300)
        grown = driver.wait_for("Resumed from", grown_group, 120)
        driver.wait_for("Epoch ", grown, 300)  # an epoch on two workers
        cluster.preempt_node()
        driver.wait_for("Preemption notice", grown, 120)
        lost = cluster.kill_node()
        shrunk_group = driver.wait_for("1 training worker(s)", lost, 300)
        shrunk = driver.wait_for("Resumed from", shrunk_group, 120)
        code = driver.finish(timeout=900)
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
    if code != 0:
        raise ResizeBenchError(f"the elastic run exited {code} (see {driver.log})")
    return dict(
        grow_s=round(grown - joined, 1),
        shrink_s=round(shrunk - lost, 1),
        grow_checkpoint=driver.line_after(r"Resizing the worker group", joined),
        grow_resumed=driver.line_after(r"Resumed from", grown_group),
        shrink_resumed=driver.line_after(r"Resumed from", shrunk_group),
    )


def fixed_run(args: argparse.Namespace, cluster: LocalCluster, env: dict, out: Path) -> None:
    cluster.add_node()
    driver = Driver(train_argv(args, "2", "fixed"), env, out / "fixed.log")
    code = driver.finish(timeout=900)
    if code != 0:
        raise ResizeBenchError(f"the fixed-size run exited {code} (see {driver.log})")


def epochs_of(run_dir: Path, name: str) -> list[dict]:
    """Each epoch of a run from its own records: summary.csv, and the samples each epoch's checkpoint counted."""
    out = []
    for epoch, row in sorted(read_summary(run_dir / SUMMARY_FILE).items()):
        meta = read_meta(run_dir / checkpoint_name(epoch))
        out.append(
            dict(
                run=name,
                epoch=epoch,
                workers=row["workers"],
                grad_accum=row["grad_accum"],
                global_batch=int(row["global_batch"]),
                train_samples=int(meta["metrics"]["train_samples"]),
                lr=float(row["lr"]),
                eval_top1=float(row["eval_top1"]),
            )
        )
    return out


def main(args: argparse.Namespace) -> int:
    if not (LOCAL / "start-head.sh").is_file():
        raise SystemExit(f"bench resize needs this project's checkout (cluster/local); {LOCAL} is not there")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("elastic", "fixed"):
        if (out / name).exists():
            raise SystemExit(f"{out / name} exists: give another --output (the bench never overwrites a run)")
    cluster = LocalCluster(args.port, args.worker_base_port)
    env = {
        **cluster.env,
        "RAY_ADDRESS": f"127.0.0.1:{args.port}",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{args.start_timeout:g}",
    }
    cluster.start()
    try:
        costs = elastic_run(args, cluster, env, out)
        if args.fixed_run:
            fixed_run(args, cluster, env, out)
    finally:
        cluster.stop()
    epochs = epochs_of(out / "elastic", "elastic") + (epochs_of(out / "fixed", "fixed") if args.fixed_run else [])
    result = dict(bench="resize", **costs, epochs=epochs, output=str(out), **environment("cpu"))
    print(json.dumps({k: v for k, v in result.items() if k != "epochs"}), flush=True)
    print_table("bench resize: per epoch", epochs, EPOCH_COLUMNS)
    print(
        f"grow: node joined -> training on 2 workers again in {costs['grow_s']} s; "
        f"shrink: node killed -> training on 1 worker again in {costs['shrink_s']} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
