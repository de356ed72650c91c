"""Optimizer and LR schedule through timm's factories, and the run-length / LR rules resolved on the driver.

timm is imported by the factories, not at the top: the driver of a Tune trial resolves the LR here without it
(core/facts.py)."""

from __future__ import annotations

import math

import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.size_schedule import reference_batch

# timm's train.py picks sqrt scaling for these families when --lr-base-scale is unset.
_SQRT_SCALED = ("ada", "lamb")


def resolve_lr(cfg: Config, num_workers: int) -> tuple[float, str]:
    """The LR to train with and how it was derived. Called once on the driver so it never drifts with workers."""
    o = cfg.optim
    if o.lr is not None:
        return o.lr, "set explicitly"
    batch = reference_batch(cfg)  # --batch-size, or the policy-average batch of scheduled sizes, as timm
    global_batch = batch * num_workers * o.grad_accum_steps
    rule = o.lr_base_scale or ("sqrt" if any(k in o.opt.lower() for k in _SQRT_SCALED) else "linear")
    ratio = global_batch / o.lr_base_size
    lr = o.lr_base * (math.sqrt(ratio) if rule == "sqrt" else ratio)
    what = "batch" if cfg.data.train_img_sizes is None else "average scheduled batch"
    return lr, (
        f"lr_base {o.lr_base} x {rule}(global batch {global_batch:g} / lr_base_size {o.lr_base_size}) "
        f"[{what} {batch:g} x {num_workers} workers x {o.grad_accum_steps} accum]"
    )


def optimizer_kwargs(cfg: Config) -> dict:
    o = cfg.optim
    # The driver's resolved LR (scaled by the global batch when --lr is unset) wins over the raw setting.
    kwargs = dict(
        opt=o.opt, lr=cfg.resolved.lr if cfg.resolved else o.lr, weight_decay=o.weight_decay, momentum=o.momentum
    )
    if o.opt_eps is not None:
        kwargs["eps"] = o.opt_eps
    if o.opt_betas is not None:
        kwargs["betas"] = tuple(o.opt_betas)
    if o.layer_decay is not None:
        kwargs["layer_decay"] = o.layer_decay
        kwargs["layer_decay_min_scale"] = o.layer_decay_min_scale
        if o.layer_decay_no_opt_scale is not None:
            kwargs["layer_decay_no_opt_scale"] = o.layer_decay_no_opt_scale
    kwargs.update(o.opt_kwargs)
    return kwargs


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2  # here: the LR rules above are the driver's, which may lack timm

    return create_optimizer_v2(model, **optimizer_kwargs(cfg))


def scheduler_kwargs(cfg: Config) -> dict:
    s = cfg.sched
    return dict(
        sched=s.sched,
        num_epochs=s.epochs,
        decay_epochs=s.decay_epochs,
        decay_milestones=list(s.decay_milestones),
        warmup_epochs=s.warmup_epochs,
        cooldown_epochs=s.cooldown_epochs,
        patience_epochs=s.patience_epochs,
        decay_rate=s.decay_rate,
        min_lr=s.min_lr,
        warmup_lr=s.warmup_lr,
        warmup_prefix=s.warmup_prefix,
        noise=s.lr_noise,
        noise_pct=s.lr_noise_pct,
        noise_std=s.lr_noise_std,
        noise_seed=cfg.run.seed,
        cycle_mul=s.lr_cycle_mul,
        cycle_decay=s.lr_cycle_decay,
        cycle_limit=s.lr_cycle_limit,
        k_decay=s.lr_k_decay,
        plateau_mode=cfg.checkpoint.score_mode,
        step_on_epochs=not s.sched_on_updates,
    )


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """(timm scheduler or None, number of epochs the schedule really runs, cooldown included)."""
    from timm.scheduler import create_scheduler_v2

    if cfg.sched.sched == "none":
        return None, cfg.sched.epochs
    return create_scheduler_v2(optimizer, **scheduler_kwargs(cfg), updates_per_epoch=updates_per_epoch)


def resolve_num_epochs(cfg: Config) -> int:
    """The schedule's true length (epochs + cooldown, + warmup with --warmup-prefix), without a model."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # no LR changes a schedule's length
    return int(build_scheduler(cfg, dummy, updates_per_epoch=1)[1])
