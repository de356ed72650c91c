"""raytrain_cls.run.tracking: the optional trackers really log (Weights & Biases in offline mode: no network)."""

from __future__ import annotations

import importlib.util

import pytest

from raytrain_cls.core.config import ConfigError, Resolved, load_config
from raytrain_cls.run.driver import wandb_run_id
from raytrain_cls.run.tracking import Trackers


def step_line(epoch: int, step: int) -> dict:
    return dict(epoch=epoch, steps=10, step=step, loss=2.0 - epoch, lr=0.1, img_per_sec=500.0)


def epoch_line(epoch: int, top1: float) -> dict:
    return dict(epoch=epoch, train_loss=1.5 - epoch * 0.1, eval_loss=1.2, eval_top1=top1, eval_top5=99.0, lr=0.05)


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_record(**where) -> Resolved:
    """The driver's record of a 2-epoch digits run, with where it lives."""
    return Resolved.from_dict(
        dict(
            use_gpu=False,
            num_workers=1,
            lr=0.05,
            lr_rule="--lr",
            num_epochs=2,
            num_classes=10,
            classes=[str(i) for i in range(10)],
            train_samples=1438,
            val_samples=359,
            data_config={},
            **where,
        )
    )


def test_wandb_run_logs_config_steps_and_epochs_and_resumes_by_id(tmp_path, offline_wandb):
    cfg = load_config("digits", {"log_wandb": True, "wandb_tags": ["smoke", "digits"], "log_tensorboard": False})
    cfg.resolved = run_record(run_dir=str(tmp_path), experiment="wb-run", wandb_id="abc12345")
    trackers = Trackers(cfg)
    run = trackers.wandb
    assert run.id == "abc12345" and run.name == "wb-run" and run.project == "raytrain-cls"
    assert set(run.tags) == {"smoke", "digits"}
    assert run.config["model"] == cfg.model.model and run.config["lr"] == 0.05
    trackers.step(step_line(0, 5))
    trackers.epoch(epoch_line(0, 80.0))
    trackers.epoch(epoch_line(1, 91.5))
    assert run.summary["epoch/eval_top1"] == 91.5 and run.summary["epoch"] == 1
    assert run.summary["train_step/loss"] == 2.0 and run.summary["global_step"] == 5
    trackers.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-abc12345.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0  # the record file `wandb sync` uploads

    again = Trackers(cfg)  # a worker group restarted by Ray: the same W&B run, not a new one
    assert again.wandb.id == "abc12345"
    again.close()


def test_wandb_run_id_is_kept_by_a_continued_run():
    cfg = load_config("digits", {"log_wandb": True} if importlib.util.find_spec("wandb") else {})
    earlier = run_record(wandb_id="keepme01")
    assert wandb_run_id(cfg, earlier) == "keepme01"
    fresh = {wandb_run_id(cfg, None) for _ in range(3)}
    assert len(fresh) == 3 and all(len(i) == 8 for i in fresh)
    cfg.run.wandb_resume_id = "named042"
    assert wandb_run_id(cfg, earlier) == "named042"


@pytest.mark.parametrize("flag,package", [("log_wandb", "wandb"), ("log_mlflow", "mlflow")])
def test_a_tracker_that_is_not_installed_is_a_config_error(monkeypatch, flag, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=f"run.{flag}.*pip install {package}"):
        load_config("digits", {flag: True})
