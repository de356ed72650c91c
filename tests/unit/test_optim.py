"""raytrain_cls.core.optim: timm's LR scaling rule, schedule length, and the optimizer/scheduler factories."""

from __future__ import annotations

import math

import pytest
import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.optim import build_optimizer, build_scheduler, resolve_lr, resolve_num_epochs


def cfg(**flat) -> Config:
    return Config().update({"dataset": "digits", **flat}).validate()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


# ---- resolve_lr ----------------------------------------------------------------------------------------------
def test_explicit_lr_is_used_as_is():
    assert resolve_lr(cfg(lr=0.37, batch_size=64), num_workers=8) == (0.37, "set explicitly")


def test_linear_scaling_for_sgd():
    """timm: lr = lr_base * global_batch / lr_base_size, global batch = batch x workers x accum."""
    lr, how = resolve_lr(cfg(batch_size=32, grad_accum_steps=2), num_workers=2)
    assert lr == pytest.approx(0.1 * 128 / 256)
    assert "linear" in how and "128" in how
    assert resolve_lr(cfg(batch_size=128), num_workers=4)[0] == pytest.approx(0.2)


@pytest.mark.parametrize("opt", ["adamw", "adam", "lamb", "adabelief", "AdamW"])
def test_sqrt_scaling_for_adaptive_optimizers(opt):
    lr, how = resolve_lr(cfg(opt=opt, batch_size=32, lr_base=0.004), num_workers=2)
    assert lr == pytest.approx(0.004 * math.sqrt(64 / 256))
    assert "sqrt" in how


def test_explicit_scale_rule_overrides_the_optimizer_default():
    assert resolve_lr(cfg(opt="adamw", lr_base_scale="linear", batch_size=64), 1)[0] == pytest.approx(0.025)
    assert resolve_lr(cfg(opt="sgd", lr_base_scale="sqrt", batch_size=64), 1)[0] == pytest.approx(0.05)


def test_lr_base_size():
    assert resolve_lr(cfg(batch_size=64, lr_base=0.5, lr_base_size=64), 3)[0] == pytest.approx(1.5)


# ---- schedule length -----------------------------------------------------------------------------------------
def test_num_epochs_plain():
    assert resolve_num_epochs(cfg(epochs=10, warmup_epochs=2)) == 10


def test_num_epochs_with_cooldown():
    assert resolve_num_epochs(cfg(epochs=10, warmup_epochs=2, cooldown_epochs=3)) == 13


def test_num_epochs_with_warmup_prefix():
    assert resolve_num_epochs(cfg(epochs=10, warmup_epochs=2, warmup_prefix=True, cooldown_epochs=3)) == 15


def test_num_epochs_on_updates():
    assert resolve_num_epochs(cfg(epochs=10, warmup_epochs=2, cooldown_epochs=1, sched_on_updates=True)) == 11


def test_sched_none():
    c = cfg(sched="none", epochs=7, cooldown_epochs=3, lr=0.1)
    optimizer = build_optimizer(c, model())
    scheduler, epochs = build_scheduler(c, optimizer, updates_per_epoch=5)
    assert scheduler is None and epochs == 7
    assert resolve_num_epochs(c) == 7


def test_cosine_scheduler_warmup_and_decay():
    c = cfg(lr=0.1, epochs=10, warmup_epochs=2, warmup_lr=0.01, min_lr=0.0)
    optimizer = build_optimizer(c, model())
    scheduler, epochs = build_scheduler(c, optimizer, updates_per_epoch=5)
    assert epochs == 10
    lrs = []
    for epoch in range(10):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(lrs[2]) and lrs[2] <= 0.1
    assert lrs[2:] == sorted(lrs[2:], reverse=True)  # decays after warmup


# ---- optimizer -----------------------------------------------------------------------------------------------
def resolved(lr: float) -> dict:
    """A config.yaml `resolved` record whose LR is ``lr``."""
    return dict(
        use_gpu=False,
        num_workers=2,
        lr=lr,
        lr_rule="--lr",
        num_epochs=3,
        num_classes=10,
        classes=[str(i) for i in range(10)],
        train_samples=1438,
        val_samples=359,
        data_config={},
    )


def test_optimizer_uses_the_resolved_lr():
    """The driver's resolved LR wins: every worker builds its optimizer with the same, recorded value."""
    c = cfg().update({"resolved": resolved(0.37)})
    assert c.optim.lr is None
    optimizer = build_optimizer(c, model())
    assert {g["lr"] for g in optimizer.param_groups} == {0.37}


def test_optimizer_falls_back_to_the_configured_lr():
    optimizer = build_optimizer(cfg(lr=0.2), model())
    assert {g["lr"] for g in optimizer.param_groups} == {0.2}
    optimizer = build_optimizer(cfg(lr=0.2).update({"resolved": resolved(0.05)}), model())
    assert {g["lr"] for g in optimizer.param_groups} == {0.05}


def test_optimizer_kind_and_momentum():
    sgd = build_optimizer(cfg(lr=0.1, momentum=0.8), model())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert sgd.param_groups[0]["nesterov"] is True  # timm's 'sgd' is Nesterov momentum


def test_weight_decay_skips_biases_and_norms():
    m = model()
    optimizer = build_optimizer(cfg(lr=0.1, weight_decay=1e-3), m)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(m[0].weight)] == decay_of[id(m[2].weight)] == 1e-3
    assert decay_of[id(m[0].bias)] == decay_of[id(m[1].weight)] == decay_of[id(m[1].bias)] == 0.0


def test_adaptive_optimizer_eps_and_betas():
    optimizer = build_optimizer(cfg(opt="adamw", lr=1e-3, opt_eps=1e-6, opt_betas=[0.8, 0.95]), model())
    group = optimizer.param_groups[0]
    assert group["eps"] == 1e-6 and tuple(group["betas"]) == (0.8, 0.95)
