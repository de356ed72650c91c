"""The per-worker train function that Ray Train runs on every worker: the only module that talks to ray.train.

Order matters and follows timm: model -> EMA (of the bare model) -> optimizer -> scheduler -> restore the
checkpoint -> DDP wrap. Ray has already created the process group (gloo on CPU, NCCL on GPU), so timm's own
distributed init is never called, and DDP is wrapped here rather than by ray.train.torch.prepare_model so EMA
and restore see the bare model.
"""
from __future__ import annotations

import math
import random
import tempfile

import numpy as np
import torch

from .config import Config
from .data import build_loaders, build_source
from .engine import TrainParts, autocast_factory, evaluate, train_one_epoch
from .loss import build_mixup, build_train_loss
from .model import build_ema, build_model
from .optim import build_optimizer, build_scheduler
from .report import epoch_line, step_line
from .state import TrainState

CHECKPOINT_PREFIX = "epoch-"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def is_better(metric: str, value: float, best) -> bool:
    """A tie counts as better: Ray's checkpoint retention also keeps the later of two equal scores, so the best
    epoch reported here is always one whose checkpoint still exists."""
    if best is None:
        return True
    return value <= best if metric == "loss" else value >= best


def quiet_per_report_logs() -> None:
    """Ray 2.60 logs every report (all metrics, every rank) at INFO through a logger named by its *file path*, so
    RunConfig(logging_config=...) does not reach it and it drowns the progress lines; raise that logger's level."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # a Ray without that module has no such logger either
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    quiet_per_report_logs()
    cfg = Config.from_dict(config)
    res = cfg.resolved
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.run.seed + rank)

    source = build_source(cfg)
    loaders = build_loaders(cfg, source, res["data_config"], rank, world)
    model = build_model(cfg, res["num_classes"], device)
    ema = build_ema(cfg, model)
    optimizer = build_optimizer(cfg, model)
    updates_per_epoch = math.ceil(len(loaders.train) / cfg.optim.grad_accum_steps)
    scheduler, _ = build_scheduler(cfg, optimizer, updates_per_epoch)
    amp_dtype = torch.float16 if cfg.precision.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if cfg.precision.amp and amp_dtype == torch.float16 else None
    state = TrainState(config, model, optimizer, scheduler, scaler, ema)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state.load(d)
        if rank == 0:
            print(f"Resumed from {checkpoint.path} after epoch {state.epoch}", flush=True)
    if scheduler is not None and state.start_epoch > 0:
        scheduler.step(state.start_epoch)  # put the optimizer's LR where the schedule says for this epoch

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_factory(device, cfg.precision.amp, amp_dtype)
    parts = TrainParts(model=train_model, optimizer=optimizer, loss_fn=build_train_loss(cfg).to(device),
                       device=device, autocast=autocast, scaler=scaler,
                       mixup=build_mixup(cfg, res["num_classes"]), scheduler=scheduler, ema=ema,
                       clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode,
                       accum_steps=cfg.optim.grad_accum_steps, channels_last=cfg.model.channels_last)
    num_epochs = res["num_epochs"]
    metric = cfg.checkpoint.eval_metric
    log = (lambda m: print(step_line(m, num_epochs), flush=True)) if rank == 0 else None
    last = {}
    for epoch in range(state.start_epoch, num_epochs):
        loaders.set_epoch(epoch)
        mixing = cfg.aug.mixup_off_epoch == 0 or epoch < cfg.aug.mixup_off_epoch
        train_metrics, state.num_updates = train_one_epoch(
            epoch, loaders.train, parts, state.num_updates, use_mixup=mixing,
            log_interval=cfg.run.log_interval, log=log)
        eval_metrics = evaluate(model, loaders.val, device, autocast, cfg.model.channels_last)
        metrics = dict(epoch=epoch, **train_metrics)
        if ema is not None:
            # As timm does: the EMA's accuracy is the run's accuracy; the raw model's is kept alongside.
            metrics.update({f"model_eval_{k}": v for k, v in eval_metrics.items()})
            eval_metrics = evaluate(ema.module, loaders.val, device, autocast, cfg.model.channels_last)
        metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if scheduler is not None:
            scheduler.step(epoch + 1, eval_metrics[metric])
        state.epoch = epoch
        if is_better(metric, eval_metrics[metric], state.best_metric):
            state.best_metric, state.best_epoch = eval_metrics[metric], epoch
        metrics.update(num_updates=state.num_updates, best_metric=state.best_metric, best_epoch=state.best_epoch)
        if rank == 0:
            print(epoch_line(metrics, num_epochs), flush=True)
        report(state, metrics, rank, f"{CHECKPOINT_PREFIX}{epoch:04d}")
        last = metrics
    return last


def report(state: TrainState, metrics: dict, rank: int, name: str) -> None:
    """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint, written complete beforehand."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raytrain-cls-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            state.save(tmp, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
