"""The README's cluster commands, run exactly as written (a local head, a job, a driver, stop)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

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
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
    finally:  # whatever happened, the head the block started goes away (by its own pid)
        subprocess.run(["bash", "cluster/local/stop.sh"], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    new_runs = [p for p in RUNS.iterdir() if p not in before]
    assert len(new_runs) == 2, new_runs  # one from the job, one from the driver
    for run in new_runs:
        result = json.loads((run / "result.json").read_text())
        assert result["best_checkpoint"] and Path(result["best_checkpoint"]).is_dir()
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
