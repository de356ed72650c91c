"""Every LR schedule, per epoch and per update, equals the curve timm's train.py gets for the same flags: the
reference is timm's own `scheduler_kwargs(args)` on an args namespace of our (timm-named) config fields, fed to
`create_scheduler_v2`. So our kwargs adapter can never silently drop or rename a schedule flag."""

from __future__ import annotations

import argparse

import pytest
import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler import scheduler_kwargs as timm_scheduler_kwargs

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.optim import build_scheduler, resolve_num_epochs

UPDATES_PER_EPOCH = 7
VARIANTS = {
    "plain": {},
    "warmup-prefix": {"warmup_epochs": 3, "warmup_prefix": True, "warmup_lr": 1e-3},
    "cooldown-min-lr": {"cooldown_epochs": 4, "min_lr": 1e-4},
    "cycles": {"lr_cycle_limit": 3, "lr_cycle_mul": 1.5, "lr_cycle_decay": 0.5},
    "k-decay": {"lr_k_decay": 2.0},
    "noise": {"lr_noise": [0.3, 0.8], "lr_noise_pct": 0.5, "lr_noise_std": 0.7, "seed": 7},
    "step-decay": {"decay_epochs": 4, "decay_rate": 0.3},
    "milestones": {"decay_milestones": [3, 9, 14], "decay_rate": 0.5},
    "patience": {"patience_epochs": 2, "decay_rate": 0.5},
}
SCHEDS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.4)


def curve(scheduler, num_epochs: int, on_updates: bool) -> list[float]:
    """LR after each update (or each epoch), driving the scheduler as the training loop does; the plateau
    scheduler gets a metric that stalls so its patience is exercised."""
    opt = scheduler.optimizer
    lrs, updates = [], 0
    for epoch in range(num_epochs):
        for _ in range(UPDATES_PER_EPOCH):
            updates += 1
            scheduler.step_update(num_updates=updates)
            if on_updates:
                lrs.append(opt.param_groups[0]["lr"])
        metric = 50.0 + min(epoch, 4)  # improves for 4 epochs, then stalls
        scheduler.step(epoch + 1, metric)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("on_updates", [False, True], ids=["per-epoch", "per-update"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sched", SCHEDS)
def test_schedule_equals_timms_for_the_same_flags(sched, variant, on_updates):
    if sched == "plateau" and on_updates:
        # timm asserts inside the worker; we refuse it before any work
        with pytest.raises(ConfigError, match="sched.sched_on_updates"):
            Config().update({"dataset": "digits", "sched": "plateau", "sched_on_updates": True}).validate()
        return
    cfg = (
        Config()
        .update(
            {
                "dataset": "digits",
                "sched": sched,
                "epochs": 16,
                "warmup_epochs": 2,
                "sched_on_updates": on_updates,
                **VARIANTS[variant],
            }
        )
        .validate()
    )
    ours, ours_epochs = build_scheduler(cfg, optimizer(), UPDATES_PER_EPOCH)
    args = argparse.Namespace(**cfg.flat())
    theirs, their_epochs = create_scheduler_v2(
        optimizer(), **timm_scheduler_kwargs(args), updates_per_epoch=UPDATES_PER_EPOCH
    )
    assert ours_epochs == their_epochs == resolve_num_epochs(cfg)
    a, b = curve(ours, ours_epochs, on_updates), curve(theirs, their_epochs, on_updates)
    assert a == b
    assert len(set(a)) > 1  # a real schedule, not a constant


def test_the_schedules_differ_from_each_other():
    """Guards the test above against comparing a constant with itself."""
    curves = {}
    for sched in SCHEDS:
        cfg = (
            Config()
            .update(
                {
                    "dataset": "digits",
                    "sched": sched,
                    "epochs": 16,
                    "decay_epochs": 4,
                    "decay_milestones": [5, 10],
                    "patience_epochs": 2,
                }
            )
            .validate()
        )
        scheduler, n = build_scheduler(cfg, optimizer(), UPDATES_PER_EPOCH)
        curves[sched] = tuple(curve(scheduler, n, False))
    assert len(set(curves.values())) == len(SCHEDS)


@pytest.mark.parametrize("on_updates", [False, True], ids=["per-epoch", "per-update"])
def test_start_epoch_sets_the_lr_and_counters_the_schedule_has_there(on_updates):
    """--start-epoch 6: the LR right after starting equals the uninterrupted schedule's LR at epoch 6."""
    from raytrain_cls.core.state import TrainState
    from raytrain_cls.run.worker import start_at_epoch

    cfg = (
        Config()
        .update(
            {"dataset": "digits", "sched": "cosine", "epochs": 16, "warmup_epochs": 2, "sched_on_updates": on_updates}
        )
        .validate()
    )
    straight, n = build_scheduler(cfg, optimizer(), UPDATES_PER_EPOCH)
    lrs = curve(straight, n, on_updates)
    # the LR in force when epoch 6 begins: the curve's value at the end of epoch 5 (per update, the curve holds
    # each epoch's updates and then its epoch-end value)
    expected = lrs[6 * (UPDATES_PER_EPOCH + 1) - 1] if on_updates else lrs[5]
    scheduler, _ = build_scheduler(cfg, optimizer(), UPDATES_PER_EPOCH)
    model = torch.nn.Linear(2, 2)
    state = TrainState({}, model, scheduler.optimizer, scheduler)
    state.in_epoch = {"epoch": 1, "batches": 3}
    start_at_epoch(state, scheduler, 6, UPDATES_PER_EPOCH, on_updates)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert state.start_epoch == 6 and state.num_updates == 6 * UPDATES_PER_EPOCH and state.in_epoch is None


def test_start_epoch_past_the_schedule_is_refused_before_any_work():
    from raytrain_cls.run.driver import resolve

    cfg = Config().update({"dataset": "digits", "epochs": 4, "cooldown_epochs": 1, "start_epoch": 5}).validate()
    with pytest.raises(ConfigError, match="sched.start_epoch.*runs 5 epochs"):
        resolve(cfg, {"CPU": 2.0})
