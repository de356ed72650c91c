"""raytrain-cls bench: the GPU-check runner works end to end on the CPU device (so a GPU session only has to
run it), records every step as a JSON line as soon as it exists, and keeps going past a failing step."""
from __future__ import annotations

import json

from raytrain_cls.cli import main


def test_gpu_checks_on_cpu_writes_a_line_per_step(tmp_path, capsys):
    code = main(["bench", "gpu-checks", str(tmp_path), "--device", "cpu", "--images", "24", "--size", "96x80",
                 "-b", "8", "-j", "0", "--model", "test_resnet", "--only", "decode,loader"])
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 0, rows
    assert [r["step"] for r in rows] == ["environment", "decode", "data", "loader-torch", "loader-gpu"]
    assert all(r["ok"] for r in rows)
    assert rows[1]["device_decode_augment_img_s"] > 0 and rows[3]["img_per_sec"] > 0 and rows[4]["img_per_sec"] > 0
    assert rows[2]["train"] == 24


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path, capsys):
    code = main(["bench", "gpu-checks", str(tmp_path), "--device", "cpu", "--images", "16", "--size", "96x80",
                 "-b", "8", "-j", "0", "--model", "no_such_model", "--only", "loader"])
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 1
    assert [(r["step"], r["ok"]) for r in rows] == [("environment", True), ("data", True),
                                                    ("loader-torch", False), ("loader-gpu", False)]
    assert "no_such_model" in rows[2]["error"]
