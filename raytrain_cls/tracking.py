"""Experiment tracking on rank 0: TensorBoard event files in the run directory, MLflow when asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import Config
from .report import is_uri

TENSORBOARD_DIR = "tensorboard"
EPOCH_SCALARS = ("train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "img_per_sec", "model_eval_top1",
                 "train_bad_samples", "eval_bad_samples")


class Trackers:
    """Whatever trackers the config turns on; every method is a no-op for the ones that are off."""

    def __init__(self, cfg: Config):
        self.tb = self.mlflow = None
        run_dir: Optional[str] = cfg.resolved.get("run_dir")
        if cfg.run.log_tensorboard and run_dir and not is_uri(run_dir):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))
        if cfg.run.log_mlflow:
            import mlflow

            mlflow.set_experiment(cfg.resolved.get("experiment") or "raytrain-cls")
            self.mlflow = mlflow
            mlflow.start_run(run_name=cfg.resolved.get("experiment"))
            mlflow.log_params({k: v for k, v in cfg.flat().items() if v is not None and v != ""})

    def step(self, m: dict) -> None:
        """A progress line's numbers, at the global step (epoch x steps + step)."""
        if self.tb is None:
            return
        global_step = m["epoch"] * m["steps"] + m["step"]
        for key in ("loss", "lr", "img_per_sec"):
            self.tb.add_scalar(f"train_step/{key}", m[key], global_step)

    def epoch(self, metrics: dict) -> None:
        values = {k: float(metrics[k]) for k in EPOCH_SCALARS if metrics.get(k) is not None}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"epoch/{key}", value, metrics["epoch"])
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=int(metrics["epoch"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
