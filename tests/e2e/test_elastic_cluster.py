"""Elastic training on a real two-node local cluster, through `bench resize` (which makes its cluster with
cluster/local and stops it by its own pids): a run with --num-workers 1:2 starts on one worker, grows to two when a
second node joins (after a checkpoint the resize waited for), shrinks back to one when that node is preempted and
killed, and finishes. From the runs' own records: every epoch trained the same samples with the same global batch
and LR as the fixed-size run beside it, and ended as accurate, within noise."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from processes import pids_mentioning

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PORT, WORKER_BASE = 6392, 6900
EPOCHS = 14


def test_an_elastic_run_grows_and_shrinks_and_trains_as_a_fixed_size_run(tmp_path):
    report = tmp_path / "resize.json"
    cmd = [sys.executable, "-m", "raytrain_cls", "bench", "resize", "--output", str(tmp_path / "runs")]
    cmd += ["--port", str(PORT), "--worker-base-port", str(WORKER_BASE), "--epochs", str(EPOCHS)]
    cmd += ["--json", str(report)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    leftovers = pids_mentioning(f"raytrain-cls-cluster-{PORT}".encode())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not leftovers, "the bench's cluster outlived it"
    result = json.loads(report.read_text())

    # The grow waited for a checkpoint and the new group started from exactly that one: nothing was lost.
    waited_for = re.search(r"after checkpoint (epoch-\S+)", result["grow_checkpoint"] or "")
    assert waited_for, result
    assert f"/{waited_for.group(1)} " in result["grow_resumed"], result
    # The shrink resumed from a checkpoint no older than the preemption notice's.
    log = (tmp_path / "runs" / "elastic.log").read_text()
    notice = int(re.search(r"Preemption notice: .* update (\d+)", log).group(1))
    assert int(re.search(r"\(update (\d+)\)", result["shrink_resumed"]).group(1)) >= notice

    elastic = [e for e in result["epochs"] if e["run"] == "elastic"]
    fixed = [e for e in result["epochs"] if e["run"] == "fixed"]
    assert [e["epoch"] for e in elastic] == [e["epoch"] for e in fixed] == list(range(EPOCHS))
    sizes = [e["workers"] for e in elastic]  # "1", "1,2" (grew during the epoch), "2", ...
    assert sizes[0] == "1" and any("2" in s.split(",") for s in sizes) and sizes[-1] == "1", sizes
    for e, f in zip(elastic, fixed):
        accum = dict(zip(e["workers"].split(","), e["grad_accum"].split(",")))
        assert all(int(w) * 32 * int(a) == 64 for w, a in accum.items()), e  # 1 x 32 x 2 = 2 x 32 x 1
        assert e["global_batch"] == f["global_batch"] == 64
        assert e["train_samples"] == f["train_samples"] == 1438 // 64 * 64  # each epoch's samples, once
        assert math.isclose(e["lr"], f["lr"], rel_tol=1e-9), (e, f)
    assert elastic[-1]["eval_top1"] >= fixed[-1]["eval_top1"] - 3.0, (elastic[-1], fixed[-1])
    recorded = json.loads((tmp_path / "runs" / "elastic" / "result.json").read_text())["epochs"]
    assert [(r["workers"], r["grad_accum"], r["global_batch"]) for r in recorded] == [
        (e["workers"], e["grad_accum"], e["global_batch"]) for e in elastic
    ]
    assert "grow: node joined -> training on 2 workers again in" in done.stdout
