"""The embedded default job, run as a user runs it (the CLI), on a private local Ray of 2 CPUs: the default CPU layout
gives it one worker that has both as its threads."""

import csv
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from raytrain_cls.commands.cli import EXIT_OK, main
from raytrain_cls.core.config import Config
from raytrain_cls.core.engine import autocast_factory, evaluate
from raytrain_cls.core.model import build_model
from raytrain_cls.core.state import MODEL_FILE, load_weights, read_meta
from raytrain_cls.data import build_loaders, build_source
from raytrain_cls.run.report import SUMMARY_COLUMNS

pytestmark = pytest.mark.integration
EPOCHS = 4


@pytest.fixture(scope="module")
def default_run(ray_local, tmp_path_factory):
    """`raytrain-cls train` with no data/model arguments: the digits recipe, shortened to a few epochs."""
    output = tmp_path_factory.mktemp("runs")
    code = main(["train", "--epochs", str(EPOCHS), "--output", str(output), "--experiment", "default"])
    return code, output / "default"


def test_default_job_succeeds_and_learns(default_run):
    code, run_dir = default_run
    assert code == EXIT_OK
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval_metric"] == "eval_top1"
    # 10 classes: chance is 10 %. Four short epochs on digits already get far above it.
    assert result["best_value"] >= 80.0, result
    assert result["last_metrics"]["epoch"] == EPOCHS - 1
    assert 0 <= result["best_epoch"] < EPOCHS
    assert Path(result["latest_checkpoint"]).is_dir()
    assert Path(result["best_checkpoint"]).is_dir()
    # Where the start-up seconds went (startup.py), up to rank 0's first step, with no negative phase.
    startup = result["startup"]
    assert startup["until"] == "first_step" and startup["total_s"] > 0, startup
    labels = [label for label, _ in startup["phases"]]
    assert labels[0].startswith("pre-Ray checks") and labels[-1] == "first training step", labels
    assert all(seconds >= 0 for _, seconds in startup["phases"])
    assert abs(sum(s for _, s in startup["phases"]) - startup["total_s"]) < 0.01


def test_summary_csv_has_timm_columns_one_row_per_epoch(default_run):
    _, run_dir = default_run
    with (run_dir / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert all(0 <= float(r["eval_top1"]) <= 100 and float(r["lr"]) > 0 for r in rows)


def test_config_yaml_is_the_resolved_config(default_run):
    _, run_dir = default_run
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = Config.from_dict(raw).validate()
    assert cfg.data.dataset == "digits" and cfg.sched.epochs == EPOCHS
    r = cfg.resolved
    assert r.num_workers == 1 and r.resources_per_worker == {"CPU": 2} and r.use_gpu is False
    assert r.num_classes == 10 and r.num_epochs == EPOCHS
    assert r.data_config["input_size"] == [3, 32, 32]
    assert r.run_dir == str(run_dir)


def test_best_checkpoint_loads_and_reproduces_its_accuracy(default_run):
    """The best checkpoint is a complete, safely loadable model: evaluating it gives the reported top-1."""
    _, run_dir = default_run
    result = json.loads((run_dir / "result.json").read_text())
    ckpt = Path(result["best_checkpoint"])
    meta = read_meta(ckpt)
    cfg = Config.from_dict(meta["config"])
    model = build_model(cfg, cfg.resolved.num_classes, torch.device("cpu"))
    load_weights(model, ckpt / MODEL_FILE)
    cfg.data.workers = 0
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved.data_config, rank=0, world_size=1)
    no_amp = autocast_factory(torch.device("cpu"), False, torch.float32)
    metrics = evaluate(model, loaders.val, torch.device("cpu"), no_amp)
    assert metrics["samples"] == cfg.resolved.val_samples
    assert abs(metrics["top1"] - result["best_value"]) <= 100.0 / metrics["samples"] + 1e-6


def test_reusing_a_run_name_is_refused_before_any_work(default_run, capsys):
    """Ray would silently resume a finished run under the same name; a new run must not."""
    _, run_dir = default_run
    code = main(["train", "--epochs", "1", "--output", str(run_dir.parent), "--experiment", "default"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_failing_run_exits_1_naming_the_rank_and_its_error(ray_local, tmp_path, capsys):
    """An absurd LR blows the loss up inside the workers: the command says so and exits 1, no traceback dump."""
    code = main(
        [
            "train",
            "--epochs",
            "1",
            "--lr",
            "1e30",
            "--warmup-epochs",
            "0",
            "--output",
            str(tmp_path),
            "--experiment",
            "diverges",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    # both ranks diverge; Ray names whichever failure it saw first
    assert re.search(r"training failed: rank [01]: ", err) and "NonFiniteLossError" in err, err
    assert "consecutive steps" in err
    assert not list((tmp_path / "diverges").glob("epoch-*")), "a checkpoint with non-finite weights was written"


def test_asking_for_gpus_on_a_cpu_cluster_fails_at_once(ray_local, tmp_path, capsys):
    """Ray would retry placing GPU workers forever; the driver checks the cluster first and says why."""
    started = time.monotonic()
    assert main(["train", "--use-gpu", "--output", str(tmp_path)]) == 2
    assert "scaling.use_gpu" in capsys.readouterr().err and time.monotonic() - started < 30
    assert not list(tmp_path.iterdir())  # nothing was started, nothing written


def test_export_cli_writes_a_model_timm_can_rebuild(default_run, tmp_path, capsys):
    _, run_dir = default_run
    best = json.loads((run_dir / "result.json").read_text())["best_checkpoint"]
    assert main(["export", best, str(tmp_path / "export")]) == EXIT_OK
    info = json.loads((tmp_path / "export" / "config.json").read_text())
    assert info["architecture"] == "resnet10t" and info["num_classes"] == 10
    assert (tmp_path / "export" / MODEL_FILE).is_file() and "Exported resnet10t" in capsys.readouterr().out


def test_eval_cli_reproduces_the_runs_top1(default_run, tmp_path, capsys):
    _, run_dir = default_run
    result = json.loads((run_dir / "result.json").read_text())
    out = tmp_path / "eval.json"
    assert main(["eval", result["best_checkpoint"], "-j", "0", "--results-file", str(out)]) == EXIT_OK
    ev = json.loads(out.read_text())
    assert ev["samples"] == 359 and sum(c["samples"] for c in ev["per_class"].values()) == 359
    assert abs(ev["top1"] - result["best_value"]) <= 100.0 / 359 + 1e-6
    assert "top1" in capsys.readouterr().out
    # the same evaluation split across 2 Ray tasks: every sample counted once, the same numbers
    on_ray = tmp_path / "eval-ray.json"
    assert (
        main(["eval", result["best_checkpoint"], "-j", "0", "--ray-workers", "2", "--results-file", str(on_ray)])
        == EXIT_OK
    )
    ev2 = json.loads(on_ray.read_text())
    assert ev2["shards"] == 2 and ev2["samples"] == 359 and ev2["per_class"] == ev["per_class"]
    assert ev2["top1"] == ev["top1"] and ev2["top5"] == ev["top5"]
    # other batch compositions: float32 kernels reduce in another order (seen: 1e-7 relative)
    assert ev2["loss"] == pytest.approx(ev["loss"], rel=1e-5)


def test_predict_cli_names_the_classes_of_known_images(default_run, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    _, run_dir = default_run
    best = json.loads((run_dir / "result.json").read_text())["best_checkpoint"]
    digits = load_digits()
    for i in range(1500, 1520):  # validation images of the fixed split are among the last 20 %
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8"), "L").save(
            tmp_path / f"{digits.target[i]}-{i}.png"
        )
    out = tmp_path / "preds.csv"
    assert main(["predict", best, str(tmp_path), "--topk", "3", "--out", str(out)]) == EXIT_OK
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(0.0 <= float(r["prob1"]) <= 1.0 for r in rows)
    right = sum(Path(r["path"]).name.split("-")[0] == r["class1"] for r in rows)
    assert right >= 16, rows  # a model at >= 80 % top-1 names most of them


def test_eval_and_predict_read_prepared_shards(default_run, tmp_path, capsys):
    """The same validation digits as Parquet shards (PNG, lossless) give the same top-1; predict reads every
    row of the shards, and an unreadable file in a folder gets an error row, not a guess."""
    _, run_dir = default_run
    result = json.loads((run_dir / "result.json").read_text())
    best = result["best_checkpoint"]
    shards = tmp_path / "shards"
    assert main(["prepare", "digits", str(shards), "-j", "0"]) == EXIT_OK
    out = tmp_path / "eval.json"
    assert (
        main(["eval", best, "--dataset", "parquet", "--data-dir", str(shards), "-j", "0", "--results-file", str(out)])
        == EXIT_OK
    )
    ev = json.loads(out.read_text())
    assert ev["samples"] == 359 and ev["skipped"] == 0
    assert abs(ev["top1"] - result["best_value"]) <= 100.0 / 359 + 1e-6
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "broken.png").write_bytes(b"not a png")
    preds = tmp_path / "preds.json"
    assert (
        main(["predict", best, str(shards), str(tmp_path / "junk"), "--format", "json", "--out", str(preds)]) == EXIT_OK
    )
    rows = json.loads(preds.read_text())
    assert len(rows) == 1797 + 1
    assert rows[-1]["path"].endswith("broken.png") and "not an image" in rows[-1]["error"]
    assert rows[0]["path"].endswith("train-00000.parquet#0") and len(rows[0]["classes"]) == 5
    assert "1 image(s) could not be read" in capsys.readouterr().err


def test_run_writes_tensorboard_events_and_plots(default_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = default_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    top1 = events.Scalars("epoch/eval_top1")
    assert [e.step for e in top1] == list(range(EPOCHS)) and "train_step/loss" in events.Tags()["scalars"]
    assert main(["plot", str(run_dir)]) == EXIT_OK
    for name in ("loss.png", "accuracy.png", "lr.png"):
        assert (run_dir / name).stat().st_size > 10_000
