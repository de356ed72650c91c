"""The README's cluster commands, run exactly as written (a local head, jobs/digits_smoke.yaml through `ray job
submit`, a driver attached by address, stop): the end-to-end submission test of the smoke job."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
RUNS = Path("/tmp/raytrain-cls-runs")


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"no {marker} block in README.md"
    return match.group(1)


def test_readme_cluster_commands_work_verbatim():
    block = readme_block("cluster-commands")
    before = set(RUNS.iterdir()) if RUNS.is_dir() else set()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
    finally:  # whatever happened, the head the block started goes away (by its own pid)
        subprocess.run(["bash", "cluster/local/stop.sh"], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    new_runs = [p for p in RUNS.iterdir() if p not in before]
    assert len(new_runs) == 2, new_runs  # one from the job, one from the driver
    for run in new_runs:
        result = json.loads((run / "result.json").read_text())
        assert result["best_checkpoint"] and (Path(result["best_checkpoint"]) / "model.safetensors").is_file()
    output = proc.stdout + proc.stderr
    assert "succeeded" in output.lower()
    # `ray job submit` streams the job's own logs: jobs/digits_smoke.yaml's 4 epochs and its final summary
    assert "Epoch 3/3" in output and "Best eval_top1" in output
    job_run = next(run for run in new_runs if yaml.safe_load((run / "config.yaml").read_text())["sched"]["epochs"] == 4)
    assert json.loads((job_run / "result.json").read_text())["best_value"] > 80
