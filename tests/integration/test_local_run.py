"""Local mode for real (`train --num-workers 0`): the run trains in the command's own process, with no Ray at all,
and leaves a Ray Train run's directory. A killed process costs only the work since its last checkpoint: `--resume`
ends with bit for bit the weights of a run never killed. No Ray is started here (so no `ray_local` fixture)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain_cls.core.config import read_yaml
from raytrain_cls.core.state import MODEL_FILE, verified_meta

pytestmark = pytest.mark.integration

EPOCHS = 3
# A tiny model, one thread (the same float sums in every run), a recovery checkpoint every 4 updates
COMMON = (
    f"--num-workers 0 --resources-per-worker CPU=1 --model test_resnet --epochs {EPOCHS} --recovery-interval 4 "
    "--checkpoint-hist 100 --log-interval 100"
).split()
# The command as a user runs it, then a check that it never imported Ray: local mode's speed rests on that.
NO_RAY = (
    "import sys; from raytrain_cls.commands.cli import main; code = main(sys.argv[1:]); "
    "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
    "print('RAY MODULES', loaded); sys.exit(code or (3 if loaded else 0))"
)


def train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, "train", *args], capture_output=True, text=True, timeout=600, env=env
    )


def summary_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "summary.csv").open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def last_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / f"epoch-{EPOCHS - 1:04d}" / MODEL_FILE))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    proc = train(*COMMON, "--output", str(out), "--experiment", "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAY MODULES []" in proc.stdout
    assert "in this process (local mode)" in proc.stdout
    return out / "straight"


def test_a_local_run_leaves_a_ray_train_run_directory(straight_run):
    config = read_yaml(straight_run / "config.yaml")
    assert config["scaling"]["num_workers"] == 0  # a --resume of it trains locally again
    assert config["resolved"]["num_workers"] == 1 and config["resolved"]["resources_per_worker"] == {"CPU": 1}
    assert summary_epochs(straight_run) == list(range(EPOCHS))
    result = json.loads((straight_run / "result.json").read_text())
    assert result["last_metrics"]["epoch"] == EPOCHS - 1 and result["best_checkpoint"]
    verified_meta(result["latest_checkpoint"])
    # Every checkpoint complete under its own name (--checkpoint-hist 100 keeps them all), nothing half-written
    names = {p.name for p in straight_run.glob("epoch-*")}
    assert {f"epoch-{e:04d}" for e in range(EPOCHS)} <= names and any(n.startswith("epoch-0001-step-") for n in names)
    assert not list(straight_run.glob(".*"))
    phases = [label for label, _ in result["startup"]["phases"]]
    assert phases[-1] == "first training step" and not [p for p in phases if "Ray" in p or "worker" in p]


def test_a_killed_local_run_resumes_to_the_same_weights(straight_run, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "raytrain_cls", "train", *COMMON, "--output", str(tmp_path), "--experiment", "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("epoch-0001-step-*")):  # mid-epoch 1, after a recovery checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "no recovery checkpoint in epoch 1"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert summary_epochs(run_dir) == [0]

    resumed = train("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "RAY MODULES []" in resumed.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["last_metrics"]["resumed_from"] > 0
    assert summary_epochs(run_dir) == list(range(EPOCHS))  # each epoch once, none lost, none twice
    straight, again = last_weights(straight_run), last_weights(run_dir)
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight), "the resumed run's weights differ"
