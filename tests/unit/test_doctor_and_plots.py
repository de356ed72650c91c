"""doctor names each broken prerequisite with a fix; plot writes real PNGs; trackers refuse a missing MLflow."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import pytest

from raytrain_cls.commands import doctor
from raytrain_cls.commands.cli import main
from raytrain_cls.commands.doctor import check_autoscaler, check_cluster, check_data, check_storage
from raytrain_cls.core.config import load_config
from raytrain_cls.run.plots import plot_run, plot_search
from raytrain_cls.run.report import write_summary


@pytest.fixture
def listening_port(monkeypatch):
    """A port that takes TCP connections, standing in for a cluster's GCS: doctor's question to the GCS itself
    (driver.probe_gcs, met with a real cluster in tests/e2e/test_cluster_jobs.py) is answered "not asked"."""
    monkeypatch.setattr(doctor, "probe_gcs", lambda address: False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_doctor_reports_a_missing_token(monkeypatch, tmp_path, listening_port):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{listening_port}")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    reach, token = check_cluster()
    assert reach.ok
    assert not token.ok and "no token" in token.detail and "ray get-auth-token" in token.fix


def test_doctor_reports_an_unreachable_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert not check_cluster()[0].ok


def test_doctor_says_what_the_autoscaler_can_add_and_from_where(monkeypatch, tmp_path):
    from raytrain_cls.run import capacity

    monkeypatch.setattr(capacity, "BOOTSTRAP_CONFIG", tmp_path / "none.yaml")
    monkeypatch.delenv(capacity.LIMITS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert check_autoscaler() is None  # a private local Ray has none
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    found = check_autoscaler()
    assert found.ok and "no limits found" in found.detail and capacity.LIMITS_ENV in found.detail
    monkeypatch.setenv(capacity.LIMITS_ENV, "GPU=4,CPU=32")
    assert check_autoscaler().detail == f"can grow the cluster to CPU 32, GPU 4 (from ${capacity.LIMITS_ENV})"
    monkeypatch.setenv(capacity.LIMITS_ENV, "GPU=four")
    bad = check_autoscaler()
    assert not bad.ok and "GPU=4,CPU=32" in bad.fix
    monkeypatch.delenv(capacity.LIMITS_ENV)
    aws = Path(__file__).parents[2] / "cluster" / "autoscaler" / "aws-gpu.yaml"
    monkeypatch.setattr(capacity, "BOOTSTRAP_CONFIG", aws)
    assert check_autoscaler().detail == f"can grow the cluster to CPU 32, GPU 4 (from {aws})"


def test_doctor_reports_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check = check_storage(str(blocker / "runs"))
    assert not check.ok and "not writable" in check.detail
    assert check_storage(str(tmp_path / "runs")).ok


def test_doctor_reports_a_missing_data_set(tmp_path):
    check = check_data(load_config("fashion_mnist", {"data_dir": str(tmp_path / "none")}))
    assert not check.ok and "apt-get install dataset-fashion-mnist" in check.detail
    assert check_data(load_config("digits")).ok


def test_doctor_cli_exits_1_on_a_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["doctor", "--output", str(tmp_path / "ok")]) == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["doctor", "--output", str(blocker / "runs")]) == 1
    assert "[FAIL] storage" in capsys.readouterr().out


def test_plot_run_writes_three_pngs(tmp_path):
    rows = {
        e: dict(
            epoch=e,
            train_loss=2 - e * 0.3,
            eval_loss=2.1 - e * 0.3,
            eval_top1=30 + 10 * e,
            eval_top5=70 + 5 * e,
            lr=0.1 / (e + 1),
        )
        for e in range(5)
    }
    write_summary(tmp_path / "summary.csv", rows)
    written = [Path(p) for p in plot_run(tmp_path)]
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "lr.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in written)


def test_plot_reads_and_writes_a_run_on_s3(tmp_path, s3_upload, capsys):
    from pyarrow import fs

    rows = {
        e: dict(
            epoch=e,
            train_loss=2 - e * 0.3,
            eval_loss=2.1 - e * 0.3,
            eval_top1=30 + 10 * e,
            eval_top5=70 + 5 * e,
            lr=0.1 / (e + 1),
        )
        for e in range(3)
    }
    write_summary(tmp_path / "run" / "summary.csv", rows)
    uri = s3_upload(tmp_path / "run", "unit/plots/run")
    assert main(["plot", uri]) == 0
    written = capsys.readouterr().out.split()
    assert [w.split("?")[0].rsplit("/", 1)[1] for w in written] == ["loss.png", "accuracy.png", "lr.png"]
    for w in written:
        s3, inner = fs.FileSystem.from_uri(w)
        assert s3.get_file_info(inner).size > 10_000


def test_plot_search_draws_every_trial(tmp_path):
    with (tmp_path / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "lr", "best_eval_top1", "best_epoch", "epochs", "checkpoint"])
        w.writerow(["a", "completed", 0.1, 90, 3, 4, ""])
        w.writerow(["b", "stopped", 1e-5, 20, 0, 1, ""])
    for trial, n in (("a", 4), ("b", 1)):
        rows = {
            e: dict(epoch=e, train_loss=1, eval_loss=1, eval_top1=20 + 20 * e, eval_top5=90, lr=0.1) for e in range(n)
        }
        write_summary(tmp_path / "trials" / f"trial-{trial}" / "summary.csv", rows)
    path = Path(plot_search(tmp_path))
    assert path.name == "trials.png" and path.stat().st_size > 10_000


def test_plot_of_a_non_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
