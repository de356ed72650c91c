"""Scheduled-resolution training (--train-img-sizes) without Ray: the size policy against timm's formulas, the
batch plan (coverage, the same step on every rank, progressive drift, cycling, exact and cross-worker-count
resumes), the per-batch loss scale in the gradient, the three loader paths' batch shapes, and the config."""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from test_gpu_decode_loader import cfg_for

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.size_schedule import SizeSchedule, batch_loss_scale, reference_batch, size_schedule
from raytrain_cls.data.sampler import ResumableDistributedSampler
from raytrain_cls.data.scheduled import ScheduledBatchSampler, budget_steps, epoch_choices

SIZES = (8, 12, 16)
BATCHES = (8, 6, 4)
N = 1001  # odd, and no multiple of any batch: tails and padding matter


def policy(
    sizes=SIZES,
    batches=BATCHES,
    probs=None,
    progressive=False,
    epochs=10,
    spread=0.65,
    mix=0.1,
    per_epoch=None,
) -> SizeSchedule:
    probs = probs or [1.0] * len(sizes)
    return SizeSchedule(
        img_sizes=tuple(sizes),
        batch_sizes=tuple(batches),
        weights=tuple(p / sum(probs) for p in probs),
        progressive=progressive,
        epochs=epochs,
        spread=spread,
        random_mix=mix,
        batches_per_epoch=per_epoch,
    )


CONSTANT = dict(probs=[0.5, 0.3, 0.2])  # sample-budget mode
FIXED = dict(probs=[0.5, 0.3, 0.2], per_epoch=40)  # constant weights, --train-batches-per-epoch
PROGRESSIVE = dict(progressive=True)  # fixed batches, inferred from the average batch
MODES = {"budget": CONSTANT, "fixed": FIXED, "progressive": PROGRESSIVE}


def sampler(schedule, rank, world, epoch=1, consumed=0, batches=0, n=N, seed=3) -> ScheduledBatchSampler:
    s = ScheduledBatchSampler(ResumableDistributedSampler(n, rank, world, seed=seed), schedule)
    s.set_epoch(epoch, consumed, batches)
    return s


def ranks(schedule, world, **kw) -> list[ScheduledBatchSampler]:
    return [sampler(schedule, rank, world, **kw) for rank in range(world)]


def steps_of(samplers: list[ScheduledBatchSampler]) -> list[list[list[tuple]]]:
    """[step][rank] -> that rank's keys; every rank takes the same steps, each of one size and one batch."""
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    assert len({tuple(s.choices()) for s in samplers}) == 1  # the same plan on every rank
    steps = [list(step) for step in zip(*per_rank)]
    choices = samplers[0].choices()
    for k, step in enumerate(steps):
        assert {len(keys) for keys in step} == {samplers[0].schedule.batch_sizes[choices[k]]}
        assert {key[3] for keys in step for key in keys} == {choices[k]}  # one size choice per step, every rank
    return steps


def indices(steps) -> list[int]:
    return [key[0] for step in steps for keys in step for key in keys]


# ---- the policy --------------------------------------------------------------------------------------------
def timm_weights(epoch: int, base: list[float], progressive: bool, epochs: int, spread: float, mix: float):
    """timm's ScheduledBatchSampler.choice_weights_for_epoch, written out in plain Python."""
    base = [b / sum(base) for b in base]
    if not progressive:
        return base
    progress = 1.0 if epochs == 1 else min(max(epoch / (epochs - 1), 0.0), 1.0)
    centre = progress * (len(base) - 1)
    if spread == 0:
        distance = [abs(i - centre) for i in range(len(base))]
        window = [float(d == min(distance)) for d in distance]
    else:
        window = [math.exp(-0.5 * ((i - centre) / spread) ** 2) for i in range(len(base))]
    window = [w * b for w, b in zip(window, base)]
    if sum(window) <= 0:
        active = [i for i, b in enumerate(base) if b > 0]
        nearest = min(active, key=lambda i: abs(i - centre))
        window = [float(i == nearest) for i in range(len(base))]
    window = [w / sum(window) for w in window]
    if mix:
        uniform = [float(b > 0) for b in base]
        window = [(1 - mix) * w + mix * u / sum(uniform) for w, u in zip(window, uniform)]
    return [w / sum(window) for w in window]


def test_size_schedule_reads_the_config_and_normalises_the_weights():
    cfg = Config().update(
        {"dataset": "digits", "batch_size": 6, "train_img_sizes": [16, 24, 32], "train_size_probs": [1, 3, 0]}
    )
    s = size_schedule(cfg.validate())
    assert s.img_sizes == (16, 24, 32) and s.batch_sizes == (6, 6, 6)  # --batch-size for every size
    assert s.weights == (0.25, 0.75, 0.0) and s.active == (0, 1) and not s.progressive
    for epoch in (0, 5, 99):
        assert s.weights_for_epoch(epoch).tolist() == [0.25, 0.75, 0.0]
    assert size_schedule(Config().update({"dataset": "digits"}).validate()) is None


def test_progressive_weights_move_from_the_first_size_to_the_last():
    s = policy(progressive=True, epochs=10)
    means = []
    for epoch in range(10):
        w = s.weights_for_epoch(epoch)
        assert float(w.sum()) == pytest.approx(1.0)
        assert w.tolist() == pytest.approx(timm_weights(epoch, [1, 1, 1], True, 10, 0.65, 0.1), abs=1e-12)
        means.append(float(w @ torch.arange(3, dtype=torch.float64)))
    assert int(s.weights_for_epoch(0).argmax()) == 0 and int(s.weights_for_epoch(9).argmax()) == 2
    assert means == sorted(means) and means[0] < 0.5 < 1.5 < means[-1]
    assert s.weights_for_epoch(50).tolist() == s.weights_for_epoch(9).tolist()  # past the schedule: the last


def test_spread_zero_picks_the_nearest_size_plus_the_random_mix():
    s = policy(progressive=True, epochs=5, spread=0, mix=0)
    assert s.weights_for_epoch(0).tolist() == [1.0, 0.0, 0.0]
    assert s.weights_for_epoch(2).tolist() == [0.0, 1.0, 0.0]  # centre 1.0
    assert s.weights_for_epoch(4).tolist() == [0.0, 0.0, 1.0]
    mixed = policy(progressive=True, epochs=5, spread=0, mix=0.3)
    assert mixed.weights_for_epoch(2).tolist() == pytest.approx([0.1, 0.8, 0.1])


def test_the_random_mix_keeps_every_allowed_size_and_zero_weights_are_never_drawn():
    probs = [1.0, 0.0, 2.0, 1.0]
    s = policy(sizes=(8, 12, 16, 20), batches=(8, 6, 4, 2), probs=probs, progressive=True, epochs=6, mix=0.2)
    for epoch in range(6):
        w = s.weights_for_epoch(epoch)
        assert w[1] == 0.0
        assert all(float(w[i]) >= 0.2 / 3 - 1e-12 for i in (0, 2, 3))
        assert w.tolist() == pytest.approx(timm_weights(epoch, probs, True, 6, 0.65, 0.2), abs=1e-12)
        drawn = set(epoch_choices(s, epoch, 400, seed=0))
        assert 1 not in drawn and drawn == {0, 2, 3}
    # the window centred on a zero-weight size falls back on the nearest allowed one
    s = policy(probs=[0, 1, 1], progressive=True, epochs=3, spread=0, mix=0)
    assert s.weights_for_epoch(0).tolist() == [0.0, 1.0, 0.0]
    budget = policy(probs=[0, 1, 1])
    assert {c for c, _ in budget_steps(budget, 1000, seed=1)} == {1, 2}
    assert budget.min_batch == 4


@pytest.mark.parametrize(
    "kw",
    [
        dict(probs=[0.5, 0.3, 0.2]),
        dict(progressive=True, epochs=10),
        dict(progressive=True, epochs=7, spread=0.3, mix=0.0, probs=[1, 2, 1]),
        dict(progressive=True, epochs=1),
        dict(progressive=True, epochs=4, spread=0, mix=0.25),
    ],
)
def test_the_average_batch_is_timms(kw):
    s = policy(**kw)
    args = (kw.get("probs", [1, 1, 1]), s.progressive, s.epochs, s.spread, s.random_mix)
    epochs = range(s.epochs) if s.progressive else range(1)
    by_hand = sum(sum(w * b for w, b in zip(timm_weights(e, *args), BATCHES)) for e in epochs) / len(epochs)
    assert s.average_batch == pytest.approx(by_hand, rel=1e-12)
    if not s.progressive:
        assert s.average_batch == pytest.approx(0.5 * 8 + 0.3 * 6 + 0.2 * 4)


def test_the_inferred_batch_count_is_timms_for_equal_batch_sizes():
    """timm (ScheduledBatchSampler._infer_num_batches): with one batch size for every choice, len // batch."""
    for s, samples in (
        (policy(sizes=(8, 16), batches=(3, 3), progressive=True, epochs=2, spread=0.3, mix=0.0), 21),
        (policy(sizes=(8, 10, 12, 14, 16), batches=(100,) * 5, progressive=True, epochs=2), 1000),
        (policy(progressive=True, batches=(8, 8, 8)), 800),
    ):
        assert s.fixed_batches(samples) == samples // s.batch_sizes[0]


TIMM_CASES = [
    # (batch sizes, probs, epochs, spread, random mix, samples per worker)
    ((8, 6, 4), [1, 1, 1], 10, 0.65, 0.1, 300),
    ((32, 24, 16), [2, 1, 1], 55, 0.0, 0.3, 4800),
    ((4, 12), [3, 3], 32, 0.65, 0.0, 5000),
    ((16, 64), [3, 3], 37, 0.65, 0.3, 4800),
    ((4, 6), [1, 1], 48, 1.0, 0.0, 4800),
    ((3, 3), [1, 1], 2, 0.3, 0.0, 21),
]


@pytest.mark.skipif(
    importlib.util.find_spec("timm.data.scheduled_sampler") is None,
    reason="the installed timm has no scheduled sampler",
)
@pytest.mark.parametrize("batches,probs,epochs,spread,mix,samples", TIMM_CASES)
def test_the_policy_matches_timms_scheduled_sampler(batches, probs, epochs, spread, mix, samples):
    from timm.data.scheduled_sampler import ScheduledBatchSampler as TimmSampler

    timm_sampler = TimmSampler(
        list(range(samples)),
        batches,
        probs,
        choice_schedule="progressive",
        schedule_epochs=epochs,
        schedule_spread=spread,
        schedule_random_mix=mix,
    )
    s = policy(
        sizes=tuple(range(len(batches))),
        batches=batches,
        probs=probs,
        progressive=True,
        epochs=epochs,
        spread=spread,
        mix=mix,
    )
    for epoch in (0, epochs // 2, epochs - 1):
        assert s.weights_for_epoch(epoch).tolist() == pytest.approx(
            timm_sampler.choice_weights_for_epoch(epoch).tolist(), abs=1e-12
        )
    assert s.average_batch == pytest.approx(timm_sampler.average_batch_size, rel=1e-12)
    assert s.fixed_batches(samples) == timm_sampler.num_batches  # the batches per epoch timm trains


# ---- the plan ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_budget_epoch_trains_each_sample_at_most_once_with_the_same_step_on_every_rank(world):
    s = policy(**CONSTANT)
    steps = steps_of(ranks(s, world))
    seen = indices(steps)
    assert len(seen) == len(set(seen))  # no padding, no repeat
    assert set(seen) <= set(range(N))
    assert N - len(seen) < world * s.min_batch + world  # only the tail too small for any batch is dropped
    assert all(key[1] == 1 and key[2] == 0 for step in steps for keys in step for key in keys)  # (epoch, copy)
    assert {step[0][0][3] for step in steps} == {0, 1, 2}


def test_the_plan_is_a_function_of_seed_and_epoch():
    s = policy(**CONSTANT)
    a, again, other = sampler(s, 0, 2, epoch=4), sampler(s, 0, 2, epoch=4), sampler(s, 0, 2, epoch=5)
    assert list(a) == list(again) and a.choices() == again.choices()
    assert a.choices() != other.choices()  # the order of the sizes changes each epoch ...
    assert sorted(a.choices()) == sorted(other.choices())  # ... the budget's mix of sizes does not
    assert sampler(s, 0, 2, epoch=4, seed=4).choices() != a.choices()
    f = policy(**FIXED)
    assert sampler(f, 1, 2, epoch=4).choices() == sampler(f, 0, 2, epoch=4).choices()
    assert sampler(f, 1, 2, epoch=4).choices() != sampler(f, 1, 2, epoch=5).choices()


def test_progressive_epochs_drift_from_the_first_size_to_the_last():
    s = policy(progressive=True, epochs=10)
    world = 2
    per_rank = math.ceil(N / world)
    expected = int(per_rank / s.average_batch)
    mean_size = {}
    for epoch in (0, 9):
        samplers = ranks(s, world, epoch=epoch)
        steps_of(samplers)
        choices = samplers[0].choices()
        assert len(choices) == expected == s.fixed_batches(per_rank)
        counts = Counter(choices)
        assert counts.most_common(1)[0][0] == (0 if epoch == 0 else 2)
        assert counts[0 if epoch == 0 else 2] > len(choices) / 2
        mean_size[epoch] = sum(SIZES[c] for c in choices) / len(choices)
    assert mean_size[0] < mean_size[9]


def test_fixed_batches_that_want_more_than_the_epoch_go_round_its_order_again():
    s = policy(probs=[0.5, 0.3, 0.2], per_epoch=200)  # 200 steps x ~6.6 x 2 ranks: more than 1001 samples
    samplers = ranks(s, 2)
    steps = steps_of(samplers)
    assert len(steps) == 200
    seen = indices(steps)
    wanted = 2 * sum(BATCHES[c] for c in samplers[0].choices())
    assert len(seen) == wanted > N
    assert set(seen) == set(range(N))  # every sample, then round again
    order = samplers[0].order.order().tolist()
    flat = [key[0] for step in steps for across_ranks in zip(*step) for key in across_ranks]  # position order
    assert flat == [order[p % N] for p in range(wanted)]
    assert samplers[0].position_after(len(steps)) == wanted  # positions past the end: the order cycles


@pytest.mark.parametrize("mode", list(MODES))
def test_a_resume_at_a_recorded_position_yields_exactly_the_remaining_batches(mode):
    s = policy(**MODES[mode])
    for k in (0, 1, 7):
        full = sampler(s, 1, 2, epoch=3)
        batches = list(full)
        position = full.position_after(k)  # what a recovery checkpoint records after k steps
        assert position == 2 * sum(len(b) for b in batches[:k])
        resumed = sampler(s, 1, 2, epoch=3, consumed=position, batches=k)
        assert resumed.first_batch == k
        assert list(resumed) == batches[k:]
        assert resumed.choices() == full.choices()[k:]
        assert resumed.position_after(len(resumed)) == full.position_after(len(full))


@pytest.mark.parametrize("mode", ["budget", "fixed"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_a_resume_on_another_worker_count_trains_the_rest_of_the_epoch(mode, new_world):
    s = policy(**MODES[mode])
    k = 5
    before = ranks(s, 2, epoch=2)
    first = steps_of(before)[:k]
    position = before[0].position_after(k)
    trained = indices(first)
    assert len(trained) == len(set(trained)) == position
    after = ranks(s, new_world, epoch=2, consumed=position, batches=k)
    rest = indices(steps_of(after))  # the same steps on every new rank
    assert not set(rest) & set(trained) and len(rest) == len(set(rest))
    # the epoch goes on from the recorded position: together, one stretch of the epoch's order
    assert sorted(trained + rest) == sorted(before[0].order.order()[: len(trained) + len(rest)].tolist())
    if mode == "budget":
        assert N - len(trained) - len(rest) < new_world * s.min_batch + new_world
    else:  # the sizes of the remaining steps do not depend on the worker count
        assert after[0].choices() == before[0].choices()[k:]
        assert after[0].first_batch == k


# ---- the loss scale ----------------------------------------------------------------------------------------
def test_loss_scale_modes_against_a_fractional_average_batch():
    assert batch_loss_scale("linear", 4.5)(9) == pytest.approx(2.0)
    assert batch_loss_scale("linear", 4.5)(3) == pytest.approx(2 / 3)
    assert batch_loss_scale("sqrt", 4.5)(9) == pytest.approx(math.sqrt(2))
    assert batch_loss_scale("none", 4.5)(9) == 1.0


@pytest.mark.parametrize("mode,factor", [("linear", 2.0), ("sqrt", math.sqrt(2.0)), ("none", 1.0)])
def test_the_engine_scales_each_batchs_gradient_by_its_size_over_the_average(mode, factor):
    from raytrain_cls.core.engine import TrainParts, train_one_epoch

    def step(scale):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
        parts = TrainParts(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
            device=torch.device("cpu"),
            autocast=lambda: torch.autocast("cpu", enabled=False),
            loss_scale=scale,
        )
        before = model[1].weight.detach().clone()
        batch = (torch.randn(9, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.arange(9) % 3)
        metrics, _ = train_one_epoch(0, [batch], parts, 0)
        return model[1].weight.detach() - before, metrics["train_loss"]

    plain, loss = step(None)
    scaled, scaled_loss = step(batch_loss_scale(mode, 4.5))  # 9 samples against an average batch of 4.5
    assert torch.allclose(scaled, factor * plain, atol=1e-6)
    assert not torch.allclose(plain, torch.zeros_like(plain))
    assert loss == pytest.approx(scaled_loss)  # the reported loss is the batch's own


# ---- the loaders -------------------------------------------------------------------------------------------
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}
SCHEDULED = {"train_img_sizes": [16, 24], "train_batch_sizes": [8, 4]}


def check_shapes(loaders, batches=None, channels=3):
    """The training batches follow the plan's sizes; validation stays at the model's input size."""
    choices = loaders.train_sampler.choices()
    assert len(loaders.train) == len(choices) > 0
    shapes = [tuple(x.shape) for x, _ in itertools.islice(loaders.train, batches)]
    want = [((8, channels, 16, 16), (4, channels, 24, 24))[c] for c in choices[: len(shapes)]]
    assert shapes == want and len({s[2] for s in shapes}) == 2  # both sizes turn up
    x, y = next(iter(loaders.val))
    assert tuple(x.shape[1:]) == (channels, 32, 32) and len(y) == x.shape[0]


def test_cpu_loader_batches_take_the_planned_size():
    from raytrain_cls.data.loader import build_loaders
    from raytrain_cls.data.sources import load_digits_source

    cfg = Config().update({"dataset": "digits", "model": "test_resnet", "batch_size": 4, "workers": 0, **SCHEDULED})
    loaders = build_loaders(cfg.validate(), load_digits_source(), DATA_CONFIG, 1, 2)
    loaders.set_epoch(1)
    assert isinstance(loaders.train_sampler, ScheduledBatchSampler)
    check_shapes(loaders, batches=16)
    assert loaders.samples_after(3) == loaders.train_sampler.position_after(3)
    loaders.set_epoch(1, loaders.samples_after(3), 3)
    assert loaders.first_batch(0) == 3 and len(loaders.train) == len(loaders.train_sampler)
    check_shapes(loaders, batches=4)


@pytest.fixture()
def tree(tmp_path):
    """An ImageFolder of PNGs of two sizes (PNG decodes alike with PIL and torchvision)."""
    rng = np.random.RandomState(0)
    for split in ("train", "validation"):
        for cls in ("ant", "bee"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(14 if split == "train" else 5):
                size = (40, 32) if i % 3 else (30, 36)
                Image.fromarray(rng.randint(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR).save(
                    folder / f"{i}.png"
                )
    return tmp_path


def folder_loaders(root, epoch=1, **flat):
    from raytrain_cls.data.loader import build_loaders
    from raytrain_cls.data.registry import build_source

    cfg = cfg_for(root, **SCHEDULED, **flat)
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1, device="cpu")
    loaders.set_epoch(epoch)
    return loaders


@pytest.mark.parametrize(
    "flat",
    [{"gpu_decode": True}, {"data_on_device": True}, {"data_on_device": True, "no_aug": True}],
    ids=["gpu_decode", "data_on_device", "data_on_device_no_aug"],
)
def test_device_loader_batches_take_the_planned_size(tree, flat):
    loaders = folder_loaders(tree, **flat)
    assert isinstance(loaders.train_sampler, ScheduledBatchSampler)
    check_shapes(loaders)


@pytest.mark.parametrize("no_aug", [False, True])
def test_resident_batches_are_the_gpu_decode_paths_with_scheduled_sizes(tree, no_aug):
    resident = list(folder_loaders(tree, epoch=2, data_on_device=True, no_aug=no_aug).train)
    streamed = list(folder_loaders(tree, epoch=2, gpu_decode=True, no_aug=no_aug).train)
    assert len(resident) == len(streamed) > 0
    for (xa, ya), (xb, yb) in zip(resident, streamed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---- the config --------------------------------------------------------------------------------------------
def scheduled_config(**flat) -> Config:
    return Config().update({"dataset": "digits", "model": "test_resnet", "batch_size": 8, **SCHEDULED, **flat})


def test_a_scheduled_config_validates():
    cfg = scheduled_config(
        train_size_probs=[1, 3],
        train_size_schedule="progressive",
        train_size_schedule_spread=0.3,
        train_size_random_mix=0.2,
        train_batches_per_epoch=50,
        variable_batch_loss_scale="sqrt",
        mixup=0.8,
    ).validate()
    assert cfg.data.train_batches_per_epoch == 50


@pytest.mark.parametrize(
    "flat,key",
    [
        ({"train_batch_sizes": [8, 4, 2]}, "data.train_batch_sizes"),
        ({"train_size_probs": [1.0]}, "data.train_size_probs"),
        ({"train_size_probs": [0, 0]}, "data.train_size_probs"),
        (
            {"train_img_sizes": [16], "train_batch_sizes": [8], "train_size_schedule": "progressive"},
            "data.train_size_schedule",
        ),
        ({"train_size_schedule_spread": 0.3}, "data.train_size_schedule_spread"),
        ({"train_size_random_mix": 0.5}, "data.train_size_random_mix"),
        ({"naflex_loader": True, "model": "naflexvit_base_patch16_gap"}, "data.naflex_loader"),
        ({"loader": "ray", "dataset": "parquet", "data_dir": "/data/shards"}, "data.loader"),
        ({"mixup": 0.8, "train_batch_sizes": [8, 5]}, "data.train_batch_sizes"),
        ({"cutmix": 1.0, "mixup_mode": "pair", "train_batch_sizes": [7, 4]}, "data.train_batch_sizes"),
        ({"aug_splits": 2}, "aug.aug_splits"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_key(flat, key):
    with pytest.raises(ConfigError) as err:
        scheduled_config(**flat).validate()
    assert err.value.key == key


def test_mixup_per_sample_takes_odd_scheduled_batches():
    scheduled_config(mixup=0.8, mixup_mode="elem", train_batch_sizes=[7, 5]).validate()


def test_an_odd_batch_size_that_scheduled_batches_replace_does_not_block_mixup():
    """With --train-batch-sizes, --batch-size sizes no training batch (validation only): mixup cannot care."""
    scheduled_config(mixup=0.8, batch_size=5).validate()


@pytest.mark.parametrize(
    "flat",
    [
        {"train_batch_sizes": [8, 4]},
        {"train_size_probs": [1, 1]},
        {"train_batches_per_epoch": 10},
        {"train_size_schedule": "progressive"},
        {"variable_batch_loss_scale": "linear"},
        {"train_size_schedule_spread": 0.3},
        {"train_size_random_mix": 0.5},
        {"train_size_schedule_spread": 0.0},  # set, although falsy
        {"train_size_random_mix": 0.0},
    ],
    ids=lambda flat: f"{next(iter(flat))}={next(iter(flat.values()))}",
)
def test_scheduled_options_without_sizes_are_refused(flat):
    (key,) = flat
    with pytest.raises(ConfigError) as err:
        Config().update({"dataset": "digits", **flat}).validate()
    assert err.value.key == f"data.{key}"


def test_timms_default_scheduled_keys_pass_without_sizes():
    """timm's args.yaml writes every key; at its defaults they ask for nothing."""
    timm_args = dict(
        train_img_sizes=None,
        train_batch_sizes=None,
        train_size_probs=None,
        train_size_schedule="constant",
        train_size_schedule_spread=0.65,
        train_size_random_mix=0.1,
        train_batches_per_epoch=None,
        train_steps_per_epoch=None,
        variable_batch_loss_scale="none",
    )
    cfg = Config().update({"dataset": "digits", **timm_args}).validate()
    assert cfg.data.train_img_sizes is None and cfg.data.train_batches_per_epoch is None


def test_the_steps_per_epoch_spelling_sets_the_batches_per_epoch():
    from raytrain_cls.commands.cli import build_parser, overrides_of

    args = build_parser().parse_args(
        [
            "train",
            "--train-img-sizes",
            "16",
            "24",
            "--train-steps-per-epoch",
            "7",
            "--variable-batch-loss-scale",
            "sqrt",
        ]
    )
    assert overrides_of(args) == {
        "train_img_sizes": [16, 24],
        "train_batches_per_epoch": 7,
        "variable_batch_loss_scale": "sqrt",
    }
    flat_yaml = Config().update({"dataset": "digits", "train_img_sizes": [16, 24], "train_steps_per_epoch": 9})
    assert flat_yaml.validate().data.train_batches_per_epoch == 9
    assert size_schedule(flat_yaml).fixed_batches(10_000) == 9


def test_the_lr_scales_with_the_average_scheduled_batch():
    from raytrain_cls.core.optim import resolve_lr

    cfg = scheduled_config(train_size_probs=[1, 3], grad_accum_steps=2).validate()  # average 0.25x8 + 0.75x4 = 5
    assert reference_batch(cfg) == pytest.approx(5.0)
    lr, how = resolve_lr(cfg, num_workers=3)
    assert lr == pytest.approx(0.1 * 5 * 3 * 2 / 256)  # timm: lr_base x global batch / lr_base_size
    assert "average scheduled batch 5" in how
    progressive = scheduled_config(train_size_schedule="progressive", epochs=10).validate()
    assert resolve_lr(progressive, 1)[0] == pytest.approx(0.1 * size_schedule(progressive).average_batch / 256)
    assert reference_batch(Config().update({"dataset": "digits", "batch_size": 24}).validate()) == 24.0
