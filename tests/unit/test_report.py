"""raytrain_cls.run.report: summary.csv keyed by epoch, console lines, result.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

from raytrain_cls.run.report import (
    SUMMARY_COLUMNS,
    build_result,
    epoch_line,
    read_summary,
    sizes_per_epoch,
    step_line,
    write_result,
    write_summary,
)
from raytrain_cls.run.train_controller import SummaryCallback


def row(epoch: int, loss: float, **extra) -> dict:
    return dict(
        epoch=epoch, train_loss=loss, eval_loss=loss + 1, eval_top1=50.0 + epoch, eval_top5=90.0, lr=0.01, **extra
    )


def test_summary_columns_start_with_timms_then_the_sizes_that_trained_each_epoch():
    assert SUMMARY_COLUMNS[:6] == ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
    assert SUMMARY_COLUMNS[6:] == ("workers", "grad_accum", "global_batch")


def test_result_json_gets_each_epochs_sizes_from_the_summary(tmp_path):
    write_summary(
        tmp_path / "summary.csv",
        {
            0: row(0, 0.9, workers="1", grad_accum="2", global_batch=64),
            1: row(1, 0.5, workers="1,2", grad_accum="2,1", global_batch=64),
        },
    )
    assert sizes_per_epoch(str(tmp_path)) == [
        dict(epoch=0, workers="1", grad_accum="2", global_batch=64),
        dict(epoch=1, workers="1,2", grad_accum="2,1", global_batch=64),
    ]
    assert sizes_per_epoch(str(tmp_path / "none")) == []


def test_write_and_read_summary(tmp_path):
    path = tmp_path / "summary.csv"
    write_summary(path, {1: row(1, 0.5), 0: row(0, 0.9, img_per_sec=123.0)})  # extra keys are dropped
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,workers,grad_accum,global_batch"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1"]  # sorted by epoch
    rows = read_summary(path)
    assert sorted(rows) == [0, 1]
    assert rows[1]["train_loss"] == "0.5" and rows[0]["eval_top1"] == "50.0"
    assert list(rows[0]) == list(SUMMARY_COLUMNS)


def test_read_missing_summary(tmp_path):
    assert read_summary(tmp_path / "none.csv") == {}


def test_repeated_epoch_replaces_its_row(tmp_path):
    """A worker-group restart that repeats epoch 1 replaces that row: one row per epoch, latest values."""
    cb = SummaryCallback(str(tmp_path))
    for metrics in (row(0, 0.9), row(1, 0.7), row(1, 0.6), row(2, 0.4)):
        cb.after_report(None, [metrics, row(99, 9.9)], None)  # only rank 0's metrics count
    rows = read_summary(tmp_path / "summary.csv")
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["train_loss"] == "0.6"
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 4


def test_summary_callback_ignores_reports_without_epoch(tmp_path):
    cb = SummaryCallback(str(tmp_path))
    cb.after_report(None, [], None)
    cb.after_report(None, [{"loss": 1.0}], None)
    assert not (tmp_path / "summary.csv").exists()


def test_step_line():
    line = step_line(
        dict(epoch=2, step=25, steps=100, loss=1.23456, lr=0.0125, img_per_sec=987.6, data_time=3.21), num_epochs=10
    )
    assert line.startswith("Train: 2/9 [  25/100 ( 25%)]")
    for part in ("loss 1.2346", "lr 1.250e-02", "988 img/s", "data 3.2s"):
        assert part in line


def test_epoch_line_with_and_without_best():
    m = dict(epoch=3, train_loss=0.5, eval_loss=0.25, eval_top1=91.234, eval_top5=99.5, lr=0.001, img_per_sec=1500)
    line = epoch_line(m, num_epochs=12)
    assert line.startswith("Epoch 3/11:")
    for part in ("train_loss 0.5000", "eval_loss 0.2500", "top1 91.23", "top5 99.50", "lr 1.000e-03", "1500 img/s"):
        assert part in line
    assert "best" not in line
    assert line + "  (best 91.2340 @ epoch 3)" == epoch_line(dict(m, best_metric=91.234, best_epoch=3), 12)


def _result(best, metrics=None):
    return SimpleNamespace(
        metrics=metrics or {"epoch": 2, "top1": 70.0},
        path="/runs/x",
        checkpoint=SimpleNamespace(path="/runs/x/epoch-2"),
        best_checkpoints=[(SimpleNamespace(path=p), m) for p, m in best],
    )


def test_build_result_picks_best_by_mode():
    best = [
        ("/c0", {"epoch": 0, "top1": 60.0, "loss": 0.9}),
        ("/c1", {"epoch": 1, "top1": 80.0, "loss": 0.7}),
        ("/c2", {"epoch": 2, "top1": 70.0, "loss": 0.5}),
    ]
    hi = build_result(_result(best), "top1", "max")
    assert (hi["best_checkpoint"], hi["best_value"], hi["best_epoch"]) == ("/c1", 80.0, 1)
    lo = build_result(_result(best), "loss", "min")
    assert (lo["best_checkpoint"], lo["best_value"], lo["best_epoch"]) == ("/c2", 0.5, 2)
    assert hi["latest_checkpoint"] == "/runs/x/epoch-2" and hi["run_dir"] == "/runs/x"


def test_build_result_breaks_ties_toward_the_later_epoch():
    """Matches the worker's best tracking, so result.json and the epoch lines name the same best epoch."""
    best = [("/c8", {"epoch": 8, "top1": 99.7, "loss": 0.2}), ("/c9", {"epoch": 9, "top1": 99.7, "loss": 0.2})]
    assert build_result(_result(best), "top1", "max")["best_checkpoint"] == "/c9"
    assert build_result(_result(best), "loss", "min")["best_checkpoint"] == "/c9"


def test_build_result_on_cloud_storage_names_checkpoints_by_uri():
    """Ray reports bucket-relative paths for a run on S3; result.json must name URIs that eval/--resume open."""
    best = [("runs/x/epoch-0", {"epoch": 0, "top1": 60.0}), ("runs/x/epoch-1", {"epoch": 1, "top1": 80.0})]
    res = SimpleNamespace(
        metrics={"epoch": 1},
        path="runs/x",
        checkpoint=SimpleNamespace(path="runs/x/epoch-1"),
        best_checkpoints=[(SimpleNamespace(path=c), m) for c, m in best],
    )
    out = build_result(res, "top1", "max", "s3://runs/x?region=eu-west-1")
    assert out["best_checkpoint"] == out["latest_checkpoint"] == "s3://runs/x/epoch-1?region=eu-west-1"
    assert out["run_dir"] == "s3://runs/x?region=eu-west-1"


def test_build_result_without_checkpoints_falls_back_to_metrics():
    res = _result([], metrics={"epoch": 4, "best_metric": 77.0, "best_epoch": 3})
    out = build_result(res, "top1", "max")
    assert out["best_checkpoint"] is None and (out["best_value"], out["best_epoch"]) == (77.0, 3)


def test_write_result(tmp_path):
    path = write_result(str(tmp_path), {"best_value": 1.5, "when": object})
    data = json.loads((tmp_path / "result.json").read_text())
    assert path == f"{tmp_path}/result.json" and data["best_value"] == 1.5 and "object" in data["when"]
