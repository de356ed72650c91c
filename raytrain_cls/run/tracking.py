"""Experiment tracking on rank 0: TensorBoard event files in the run directory; MLflow and Weights & Biases when
asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from raytrain_cls.core.config import Config
from raytrain_cls.core.storage import is_uri

TENSORBOARD_DIR = "tensorboard"
EPOCH_SCALARS = (
    "train_loss",
    "eval_loss",
    "eval_top1",
    "eval_top5",
    "lr",
    "img_per_sec",
    "model_eval_top1",
    "train_bad_samples",
    "eval_bad_samples",
)
STEP_SCALARS = ("loss", "lr", "img_per_sec")


class Trackers:
    """Whatever trackers the config turns on; every method is a no-op for the ones that are off."""

    def __init__(self, cfg: Config):
        self.tb = self.mlflow = self.wandb = None
        run_dir: Optional[str] = cfg.resolved.run_dir
        if cfg.run.log_tensorboard and run_dir and not is_uri(run_dir):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))
        if cfg.run.log_mlflow:
            import mlflow

            mlflow.set_experiment(cfg.resolved.experiment or "raytrain-cls")
            self.mlflow = mlflow
            mlflow.start_run(run_name=cfg.resolved.experiment)
            mlflow.log_params({k: v for k, v in cfg.flat().items() if v is not None and v != ""})
        if cfg.run.log_wandb:
            self.wandb = start_wandb(cfg, run_dir)

    def step(self, m: dict) -> None:
        """A progress line's numbers, at the global step (epoch x steps + step)."""
        global_step = m["epoch"] * m["steps"] + m["step"]
        if self.tb is not None:
            for key in STEP_SCALARS:
                self.tb.add_scalar(f"train_step/{key}", m[key], global_step)
        if self.wandb is not None:
            self.wandb.log({"global_step": global_step, **{f"train_step/{k}": float(m[k]) for k in STEP_SCALARS}})

    def epoch(self, metrics: dict) -> None:
        values = {k: float(metrics[k]) for k in EPOCH_SCALARS if metrics.get(k) is not None}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"epoch/{key}", value, metrics["epoch"])
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=int(metrics["epoch"]))
        if self.wandb is not None:
            self.wandb.log({"epoch": int(metrics["epoch"]), **{f"epoch/{k}": v for k, v in values.items()}})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg: Config, run_dir: Optional[str]):
    """A W&B run keyed by the id the driver chose (cfg.resolved.wandb_id): "allow" resumes it after a restart,
    "must" when the user named an existing run. Steps and epochs each get their own x axis."""
    import wandb

    r = cfg.resolved
    run = wandb.init(
        project=cfg.run.wandb_project or "raytrain-cls",
        name=r.experiment,
        id=r.wandb_id,
        resume="must" if cfg.run.wandb_resume_id else "allow",
        tags=list(cfg.run.wandb_tags) or None,
        dir=run_dir if run_dir and not is_uri(run_dir) else None,
        config={**cfg.flat(), "lr": r.lr, "num_epochs": r.num_epochs, "num_workers": r.num_workers},
    )
    run.define_metric("global_step")
    run.define_metric("train_step/*", step_metric="global_step")
    run.define_metric("epoch")
    run.define_metric("epoch/*", step_metric="epoch")
    return run
