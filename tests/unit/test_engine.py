"""raytrain_cls.core.engine: the plain-PyTorch train/eval loop (no Ray, no process group, CPU)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import timm
import torch

from raytrain_cls.core.engine import NonFiniteLossError, TrainParts, autocast_factory, evaluate, train_one_epoch

CPU = torch.device("cpu")
NO_AMP = autocast_factory(CPU, False, torch.float32)


def quadrant_data(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k (0..3) = which quadrant of the image is bright; noise elsewhere. Learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 3, size, size, generator=g) * 0.3
    h = size // 2
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 1.0
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]


def parts_for(model: torch.nn.Module, optimizer=None, **kw) -> TrainParts:
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    return TrainParts(
        model=model,
        optimizer=optimizer,
        loss_fn=torch.nn.CrossEntropyLoss(),
        device=CPU,
        autocast=kw.pop("autocast", NO_AMP),
        **kw,
    )


def linear_model(seed: int = 0, in_features: int = 12, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, classes))


# ---- training ------------------------------------------------------------------------------------------------
def test_train_one_epoch_learns_with_a_timm_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    parts = parts_for(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = batches(*quadrant_data(32), 8)
    losses, updates = [], 0
    for epoch in range(4):
        metrics, updates = train_one_epoch(epoch, loader, parts, updates)
        losses.append(metrics["train_loss"])
    assert updates == 16
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["train_samples"] == 32 and metrics["updates_per_epoch"] == 4
    assert metrics["lr"] == pytest.approx(1e-2)
    assert model.training  # train mode on


def test_train_loss_is_the_sample_weighted_mean():
    """train_loss averages per sample, so a short last batch does not count as much as a full one."""
    model = linear_model()
    x, y = torch.randn(5, 12), torch.tensor([0, 1, 2, 0, 1])
    frozen = parts_for(model, torch.optim.SGD(model.parameters(), lr=0.0))
    metrics, _ = train_one_epoch(0, batches(x, y, 3), frozen, 0)
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert metrics["train_loss"] == pytest.approx(expected, rel=1e-5)


def _train(model, loader, accum):
    parts = parts_for(model, torch.optim.SGD(model.parameters(), lr=0.5), accum_steps=accum)
    return train_one_epoch(0, loader, parts, 0)


def test_grad_accumulation_matches_a_bigger_batch():
    """accum 2 x batch b is the same optimizer update as accum 1 x batch 2b (no batch norm)."""
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    small, big = linear_model(), linear_model()
    m_small, n_small = _train(small, batches(x, y, 4), accum=2)
    m_big, n_big = _train(big, batches(x, y, 8), accum=1)
    assert n_small == n_big == 2 and m_small["updates_per_epoch"] == 2
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small[1].weight, linear_model()[1].weight)  # it did train


def test_grad_accumulation_short_last_group():
    """3 micro-batches with accum 2: the last update averages over its 1 micro-batch, not over 2."""
    x, y = torch.randn(12, 12), torch.randint(0, 3, (12,))
    acc, ref = linear_model(), linear_model()
    _, n_acc = _train(acc, batches(x, y, 4), accum=2)
    # Reference: one update on the first 8 samples, one on the last 4.
    ref_loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    _, n_ref = _train(ref, ref_loader, accum=1)
    assert n_acc == n_ref == 2
    for a, b in zip(acc.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_the_run_after_nan_patience_steps():
    """A NaN poisons the weights, every later loss is NaN too: the streak reaches the patience and the run stops."""
    model = linear_model()
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    x[0, 0] = float("nan")
    logged = []
    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 2 consecutive steps"):
        train_one_epoch(3, batches(x, y, 4), parts_for(model), 0, log_interval=10, log=logged.append, nan_patience=2)
    assert logged == []  # stopped at step 2 of 4, before any progress line


def test_a_deferred_finite_watch_reads_each_poll_one_poll_late_and_now_at_once():
    """The CUDA mode of FiniteWatch (no host stall: each poll reads the copy the poll before started), run on
    the CPU: a streak that reaches the patience is caught at the next poll, naming the step it was seen at."""
    from raytrain_cls.core.engine import FiniteWatch

    watch = FiniteWatch(torch.device("cpu"), patience=3, epoch=7, deferred=True)
    watch.poll(torch.tensor(0), step=3)
    watch.poll(torch.tensor(3), step=6)  # reads step 3's copy (0): nothing yet
    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 3 consecutive steps.*epoch 7 step 6"):
        watch.poll(torch.tensor(3), step=9)
    with pytest.raises(NonFiniteLossError, match="epoch 7 step 10"):
        FiniteWatch(torch.device("cpu"), 3, 7, deferred=True).now(torch.tensor(4), step=10)
    assert not FiniteWatch(torch.device("cpu"), 3, 7).deferred  # on the CPU a read costs nothing: no delay


def test_an_epoch_of_only_non_finite_losses_fails_even_below_the_patience():
    model = linear_model()
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    x[0, 0] = float("inf") * 0
    with pytest.raises(NonFiniteLossError, match="every training loss in epoch 0 was non-finite"):
        train_one_epoch(0, batches(x, y, 4), parts_for(model), 0, nan_patience=5)


def test_an_epoch_continued_from_its_middle_matches_the_straight_epoch():
    """What a mid-epoch recovery checkpoint relies on: stop after 2 of 4 batches, hand over the progress (the
    position and this rank's running loss sums), continue with the rest: same weights, same epoch loss."""
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    straight = linear_model()
    full, n_full = _train(straight, batches(x, y, 4), 1)

    resumed = linear_model()
    progress = []
    p = parts_for(resumed)
    train_one_epoch(
        0,
        batches(x, y, 4)[:2],
        p,
        0,
        on_update=lambda pr: progress.append((pr.batches_done, pr.num_updates, pr.loss_sum.item(), pr.seen.item())),
    )
    done, updates, loss_sum, seen = progress[-1]
    assert (done, updates, seen) == (2, 2, 8)
    rest, n_rest = train_one_epoch(0, batches(x, y, 4)[2:], p, updates, start_batch=done, carry=(loss_sum, seen))
    assert n_rest == n_full == 4
    assert rest["train_loss"] == pytest.approx(full["train_loss"], rel=1e-12)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_log_lines_every_interval_and_at_the_end():
    model = linear_model()
    x, y = torch.randn(20, 12), torch.randint(0, 3, (20,))
    logged = []
    train_one_epoch(1, batches(x, y, 4), parts_for(model), 0, log_interval=2, log=logged.append)
    assert [m["step"] for m in logged] == [2, 4, 5]
    assert all(m["steps"] == 5 and m["epoch"] == 1 and math.isfinite(m["loss"]) for m in logged)
    assert logged[0]["lr"] == pytest.approx(0.5)


def test_scheduler_and_ema_are_stepped_per_update():
    calls = []

    class Sched:
        def step_update(self, num_updates):
            calls.append(("sched", num_updates))

    class Ema:
        def update(self, model, step):
            calls.append(("ema", step))

    model = linear_model()
    x, y = torch.randn(12, 12), torch.randint(0, 3, (12,))
    _, updates = train_one_epoch(0, batches(x, y, 4), parts_for(model, scheduler=Sched(), ema=Ema(), accum_steps=2), 10)
    assert updates == 12
    assert calls == [("ema", 11), ("sched", 11), ("ema", 12), ("sched", 12)]


def test_mixup_applied_only_when_enabled():
    seen = []

    def mixup(x, y):
        seen.append(len(y))
        return x, y

    model = linear_model()
    loader = batches(torch.randn(8, 12), torch.randint(0, 3, (8,)), 4)
    train_one_epoch(0, loader, parts_for(model, mixup=mixup), 0)
    assert seen == [4, 4]
    train_one_epoch(1, loader, parts_for(model, mixup=mixup), 0, use_mixup=False)
    assert seen == [4, 4]


def test_gradient_clipping_by_value_bounds_the_update():
    model = linear_model()
    before = copy.deepcopy(model)
    parts = parts_for(model, torch.optim.SGD(model.parameters(), lr=1.0), clip_grad=1e-3, clip_mode="value")
    train_one_epoch(0, [(torch.randn(4, 12) * 100, torch.tensor([0, 1, 2, 0]))], parts, 0)
    for a, b in zip(model.parameters(), before.parameters()):
        assert (a - b).abs().max() <= 1e-3 + 1e-7
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), before.parameters()))


# ---- evaluation ----------------------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """Returns row i of a fixed logit table for input value i, whatever the batching."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_evaluate_top1_top5_exact():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # label 0: rank 1
            [1.0, 9, 2, 3, 4, 5, 0],  # label 1: rank 1
            [1.0, 2, 3, 9, 5, 6, 0],  # label 2: rank 4 -> top5 hit, top1 miss
            [1.0, 2, 3, 9, 5, 6, 7],  # label 4: rank 4 -> top5 hit
            [1.0, 2, 3, 9, 5, 6, 7],  # label 0: rank 7 -> miss
        ]
    )
    y = torch.tensor([0, 1, 2, 4, 0])
    x = torch.arange(5, dtype=torch.float32)[:, None]
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    out = evaluate(FixedLogits(logits), loader, CPU, NO_AMP)
    assert out["samples"] == 5
    assert out["top1"] == pytest.approx(40.0)
    assert out["top5"] == pytest.approx(80.0)
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_evaluate_top5_with_fewer_than_five_classes():
    """With 3 classes top-5 means 'any of the 3': always 100%, and it must not crash on topk(5)."""
    logits = torch.tensor([[3.0, 2, 1], [3.0, 2, 1], [1.0, 2, 3], [3.0, 1, 2]])
    y = torch.tensor([0, 2, 2, 1])
    x = torch.arange(4, dtype=torch.float32)[:, None]
    out = evaluate(FixedLogits(logits), [(x, y)], CPU, NO_AMP)
    assert out["top1"] == pytest.approx(50.0) and out["top5"] == pytest.approx(100.0)


def test_evaluate_empty_loader():
    out = evaluate(FixedLogits(torch.zeros(1, 3)), [], CPU, NO_AMP)
    assert out == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "samples": 0}


def test_evaluate_uses_eval_mode_and_no_grad():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.99), torch.nn.Linear(12, 3))
    x, y = torch.randn(6, 12), torch.randint(0, 3, (6,))
    a = evaluate(model, [(x, y)], CPU, NO_AMP)
    b = evaluate(model, [(x, y)], CPU, NO_AMP)
    assert a == b and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_with_tta_averages_in_the_flipped_images():
    """--tta: each image's logits are averaged with its mirror image's; a model that tells left from right
    then scores differently, and the metrics are those of the averaged logits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    plain = evaluate(model, [(x, y)], CPU, NO_AMP)
    flipped = evaluate(model, [(x, y)], CPU, NO_AMP, tta=1)
    with torch.no_grad():
        averaged = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    assert flipped["loss"] == pytest.approx(torch.nn.functional.cross_entropy(averaged, y).item(), rel=1e-6)
    assert flipped["loss"] != pytest.approx(plain["loss"])


# ---- precision -----------------------------------------------------------------------------------------------
def test_autocast_factory_disabled_is_a_no_op():
    assert autocast_factory(CPU, False, torch.bfloat16) is contextlib.nullcontext


def test_bf16_autocast_path():
    autocast = autocast_factory(CPU, True, torch.bfloat16)
    layer = torch.nn.Linear(4, 2)
    with autocast():
        assert layer(torch.randn(3, 4)).dtype == torch.bfloat16
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    parts = parts_for(model, torch.optim.SGD(model.parameters(), lr=0.05), autocast=autocast)
    loader = batches(*quadrant_data(16), 8)
    metrics, updates = train_one_epoch(0, loader, parts, 0)
    assert updates == 2 and math.isfinite(metrics["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 under autocast
    out = evaluate(model, loader, CPU, autocast)
    assert out["samples"] == 16 and math.isfinite(out["loss"])
