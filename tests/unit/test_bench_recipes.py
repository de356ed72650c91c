"""gpu-checks' training variants (bench/recipes.py): each runs as its own train command and passes only when its
summary.csv shows the epochs asked for, finite losses and a model that learned; a resume continues the other
variant's run. Run for real in local mode (no Ray), on the embedded digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain_cls.bench import recipes
from raytrain_cls.bench.recipes import Variant, check_summary, command, run_variant
from raytrain_cls.entry import main

HEADER = "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,workers,grad_accum,global_batch\n"


def write_summary(run_dir: Path, *rows: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.csv").write_text(HEADER + "".join(f"{r}\n" for r in rows))
    return run_dir


def test_a_run_that_trained_the_epochs_asked_for_passes(tmp_path):
    run = write_summary(tmp_path / "r", "0,2.1,1.9,40.0,80,0.1,1,1,64", "1,1.2,1.0,75.5,95,0.05,1,1,64")
    assert check_summary(run, 2, min_top1=20.0) == dict(epochs=2, top1=[40.0, 75.5], train_loss=[2.1, 1.2])


@pytest.mark.parametrize(
    "rows, match",
    [
        (["0,2.1,1.9,40.0,80,0.1,1,1,64"], r"holds epochs \[0\], expected 0..1"),
        (["0,2.1,1.9,40.0,80,0.1,1,1,64", "1,nan,1.0,75.5,95,0.05,1,1,64"], "not finite"),
        (["0,2.3,2.3,10.2,50,0.1,1,1,64", "1,2.3,2.3,9.8,50,0.05,1,1,64"], "9.80 after 2 epochs, not above 20.0"),
    ],
    ids=["an-epoch-missing", "a-nan-loss", "still-at-chance"],
)
def test_a_run_that_did_not_train_as_asked_fails_with_the_reason(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        check_summary(write_summary(tmp_path / "r", *rows), 2, min_top1=20.0)


def test_a_resume_continues_the_other_variants_run_with_its_own_config():
    new = command("jobs/x.yaml", Variant("fp16", ("--amp-dtype", "float16"), 2), ["--data-dir", "d"], "/o")
    assert new[new.index("train") + 1 :] == [
        "-c", "jobs/x.yaml", "--experiment", "fp16", "--output", "/o", "--data-dir", "d", "--amp-dtype", "float16"
    ]  # fmt: skip
    resumed = command("jobs/x.yaml", Variant("fp16-resumed", ("--epochs", "3"), 3, resumes="fp16"), ["-b", "8"], "/o")
    assert resumed[resumed.index("train") + 1 :] == ["--resume", "fp16", "--output", "/o", "-b", "8", "--epochs", "3"]


def test_the_gpu_variants_cover_issue_27s_training_paths():
    flags = {v.name: v.flags for v in recipes.GPU_VARIANTS}
    assert "float16" in flags["fp16"] and "--torchcompile" in flags["compile"] and "--sync-bn" in flags["sync-bn"]
    assert flags["local"][:2] == ("--num-workers", "0")
    resumed = next(v for v in recipes.GPU_VARIANTS if v.resumes)
    assert resumed.resumes == "fp16" and resumed.epochs == 3  # one epoch more than the run it continues


def test_local_variants_train_and_resume_for_real(tmp_path):
    flags = ["--model", "test_resnet", "--resources-per-worker", "CPU=1", "--log-interval", "100"]
    local = Variant("local", ("--num-workers", "0", "--epochs", "2"), 2)
    first = run_variant(None, local, flags, str(tmp_path), min_top1=15.0)
    resumed = run_variant(None, Variant("again", ("--epochs", "3"), 3, resumes="local"), flags, str(tmp_path), 15.0)
    assert first["variant"] == "local" and len(first["top1"]) == 2
    assert resumed["top1"][:2] == first["top1"]  # the finished epochs are not redone
    assert len(resumed["top1"]) == 3 and not (tmp_path / "again").exists()
    with pytest.raises(RuntimeError, match="train exited 2"):  # a refused flag: its message comes back
        run_variant(None, Variant("bad", ("--num-workers", "0", "--sync-bn"), 1), flags, str(tmp_path))


def test_gpu_checks_run_the_variants_and_the_startup_pair_on_request(tmp_path, monkeypatch, capsys):
    import raytrain_cls.bench.startup as bench_startup

    calls = []

    def fake_variant(recipe, variant, flags, output):
        calls.append((variant.name, flags, output))
        if variant.name == "compile":
            raise RuntimeError("train exited 1 after 3 s: inductor missing")
        return dict(variant=variant.name, top1=[50.0])

    def fake_startup_command(cmd, what):  # bench startup's own line: its ok says whether the target was met
        calls.append(("startup", cmd[cmd.index("--") + 1 :]))
        return dict(bench="startup", ratio=2.5, ok=False, local_ratio=1.1, local_ok=True)

    monkeypatch.setattr(recipes, "run_variant", fake_variant)
    monkeypatch.setattr(bench_startup, "_json_line_of", fake_startup_command)
    argv = ["bench", "gpu-checks", str(tmp_path), "--device", "cpu", "--only", "recipe,startup"]
    code = main([*argv, "--fm-dir", "/data/fm", "--tta-flags=-b 64", "--work-dir", str(tmp_path / "w")])
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 1, rows  # a failed step fails the command, after the others ran
    names = [f"recipe-{v.name}" for v in recipes.GPU_VARIANTS]
    assert [r["step"] for r in rows] == ["environment", *names, "startup"]
    failed = {r["step"]: r["error"] for r in rows if not r["ok"]}
    assert failed == {"recipe-compile": "RuntimeError: train exited 1 after 3 s: inductor missing"}
    flags = ["--data-dir", "/data/fm", "--no-use-gpu", "-b", "64"]
    assert calls[0] == ("bf16", flags, str(tmp_path / "w" / "recipe-runs"))
    assert calls[-1] == ("startup", [*flags, "--no-data-on-device"])
    assert rows[-1]["ok"] and not rows[-1]["target_met"] and rows[-1]["local_target_met"]
