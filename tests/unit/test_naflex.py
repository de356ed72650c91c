"""--naflex-loader without Ray: the batch plan (coverage, equal rank batches, exact resume), the loader's patch
batches, mixup, bad images, the loss scale, the config's refusals and the driver's model check."""

import math

import pytest
import torch

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.size_schedule import batch_loss_scale as loss_scale
from raytrain_cls.data.naflex import (
    NaFlexBatchSampler,
    NaFlexItem,
    NaFlexTrainCollate,
    canonical_steps,
    step_batch_size,
)
from raytrain_cls.data.sampler import ResumableDistributedSampler
from raytrain_cls.data.samples import BadSample

SEQ_LENS = [4, 16, 36]
TOKENS = 16 * 36  # --batch-size 16 at the longest sequence


def sampler(n: int, rank: int, world: int, seed: int = 3) -> NaFlexBatchSampler:
    return NaFlexBatchSampler(ResumableDistributedSampler(n, rank, world, seed=seed), SEQ_LENS, TOKENS)


def epoch_batches(n: int, world: int, epoch: int, consumed: int = 0) -> list[list[list[tuple]]]:
    """[step][rank] -> that rank's keys."""
    per_rank = []
    for rank in range(world):
        s = sampler(n, rank, world)
        s.set_epoch(epoch, consumed)
        per_rank.append(list(s))
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    return [list(step) for step in zip(*per_rank)]


def test_batch_sizes_follow_timms_token_budget():
    assert step_batch_size(TOKENS, 4) == 144 and step_batch_size(TOKENS, 16) == 32  # 36 rounded down to 8s
    assert step_batch_size(TOKENS, 36) == 16 and step_batch_size(10, 36) == 1  # never below one
    steps = canonical_steps(1000, SEQ_LENS, TOKENS, seed=0)
    assert sum(b for _, b in steps) == 1000 and {s for s, _ in steps} == set(SEQ_LENS)
    assert all(b == step_batch_size(TOKENS, s) for s, b in steps[:-1])  # only the last is cut short


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_trains_every_sample_once_with_equal_batches_on_every_rank(world):
    n = 1001
    steps = epoch_batches(n, world, epoch=2)
    indices = []
    for step in steps:
        sizes = {len(keys) for keys in step}
        assert len(sizes) == 1  # DDP ranks in lock-step: the same batch size at every step
        lens = {k[3] for keys in step for k in keys}
        assert len(lens) == 1 and lens <= set(SEQ_LENS)  # one sequence length per step, on every rank
        indices += [k[0] for keys in step for k in keys]
    assert set(indices) == set(range(n))
    assert len(indices) - n == (-n) % world  # padding only to fill the last step on every rank


def test_the_plan_keeps_its_step_count_but_not_its_order_across_epochs():
    a, b = sampler(1000, 0, 2), sampler(1000, 0, 2)
    b.set_epoch(1)
    assert len(a) == len(b)
    assert sorted((s.seq_len, s.batch) for s in a.steps) == sorted((s.seq_len, s.batch) for s in b.steps)
    assert [s.seq_len for s in a.steps] != [s.seq_len for s in b.steps]


def test_a_resume_at_a_recorded_position_continues_the_exact_plan():
    s = sampler(1000, 1, 2)
    s.set_epoch(4)
    full = list(s)
    position = s.position_after(5)  # what a recovery checkpoint records after 5 steps
    resumed = sampler(1000, 1, 2)
    resumed.set_epoch(4, position)
    assert list(resumed) == full[5:]
    assert resumed.position_after(len(resumed)) == 1000


def test_a_resume_on_another_worker_count_trains_the_rest_of_the_epoch_once():
    first = epoch_batches(1000, 2, epoch=1)
    done = sampler(1000, 0, 2)
    done.set_epoch(1)
    position = done.position_after(4)
    trained = {k[0] for step in first[:4] for keys in step for k in keys}
    assert len(trained) == position
    rest = [k[0] for step in epoch_batches(1000, 3, epoch=1, consumed=position) for keys in step for k in keys]
    remaining = set(range(1000)) - trained
    assert set(rest) >= remaining
    assert len(rest) - len(remaining) < 3  # only the padding of the last step (< 3 ranks) repeats a sample


def item(target: int, position: int, size: int = 8) -> NaFlexItem:
    return NaFlexItem(torch.full((1, size, size), float(target)), target, 0, position, 16, 0)


def test_collate_patchifies_pads_and_refills_unreadable_samples():
    collate = NaFlexTrainCollate([4], mixup=None, seed=0)
    x, y, bad = collate([item(1, 0), BadSample("a.png", "truncated"), item(2, 2), item(3, 3, size=4)])
    assert [b.where for b in bad] == ["a.png"]
    assert x["patches"].shape == (4, 16, 16) and y.tolist() == [1, 2, 3, 1]  # the batch keeps its size
    assert x["patch_valid"].sum(dim=1).tolist() == [4, 4, 1, 4]  # an 8x8 image is 4 patches, 4x4 one
    assert torch.equal(x["patches"][0, :4], torch.ones(4, 16))
    assert collate([BadSample("b.png", "empty")])[0] is None


def test_mixup_in_the_loader_gives_soft_targets_seeded_by_position():
    from timm.data import NaFlexMixup

    def batch(seed):
        mixup = NaFlexMixup(num_classes=5, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1)
        return NaFlexTrainCollate([4], mixup=mixup, seed=seed)([item(t, 10 + t) for t in range(4)])

    x, y, _ = batch(7)
    assert y.shape == (4, 5) and torch.allclose(y.sum(dim=1), torch.ones(4))
    assert ((y > 0.05).sum(dim=1) == 2).any()  # mixed: rows carry two classes (smoothing alone gives 0.02)
    again, y2, _ = batch(7)
    assert torch.equal(x["patches"], again["patches"]) and torch.equal(y, y2)
    assert not torch.equal(y, batch(8)[1])


def test_loss_scale_modes():
    assert loss_scale("linear", 16)(144) == 9.0 and loss_scale("none", 16)(144) == 1.0
    assert loss_scale("sqrt", 16)(64) == pytest.approx(2.0)


def test_the_engine_scales_each_batchs_gradient():
    from raytrain_cls.core.engine import TrainParts, train_one_epoch

    def step(scale):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 3))
        wrapped = DictModel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        parts = TrainParts(
            model=wrapped,
            optimizer=optimizer,
            loss_fn=torch.nn.CrossEntropyLoss(),
            device=torch.device("cpu"),
            autocast=lambda: torch.autocast("cpu", enabled=False),
            loss_scale=scale,
        )
        before = model[1].weight.detach().clone()
        batch = (
            {"patches": torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(1))},
            torch.tensor([0, 1, 2, 0, 1, 2]),
        )
        metrics, _ = train_one_epoch(0, [batch], parts, 0)
        return model[1].weight.detach() - before, metrics["train_loss"]

    plain, loss = step(None)
    doubled, loss2 = step(loss_scale("linear", 3))  # 6 samples against --batch-size 3: twice the gradient
    assert torch.allclose(doubled, 2 * plain, atol=1e-6)
    assert loss == pytest.approx(loss2)  # the reported loss is the batch's own, unscaled


class DictModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x["patches"])


def naflex_config(**extra) -> Config:
    cfg = Config()
    cfg.update(
        {
            **dict(
                dataset="digits",
                model="naflexvit_base_patch16_gap",
                naflex_loader=True,
                in_chans=1,
                model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=4),
                batch_size=8,
                workers=0,
                naflex_train_seq_lens=SEQ_LENS,
                naflex_max_seq_len=16,
            ),
            **extra,
        }
    )
    return cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("aug_splits", 2),
        ("aug_repeats", 3),
        ("gpu_decode", True),
        ("cutmix_minmax", [0.2, 0.8]),
        ("tta", 1),
        ("save_images", True),
        ("mixup_mode", "elem"),
        ("naflex_patch_size_probs", [0.5, 0.5]),
    ],
)
def test_what_cannot_come_along_is_refused_by_name(key, value):
    cfg = naflex_config(**{key: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert key in err.value.key


def test_the_driver_refuses_a_model_that_takes_images_and_records_the_patch_size():
    from raytrain_cls.run.driver import resolve

    cfg = naflex_config()
    cfg.validate()
    resolve(cfg, {"CPU": 2})
    assert cfg.resolved.naflex_patch_size == 4 and cfg.resolved.data_config["input_size"][0] == 1
    cfg = naflex_config(model="resnet10t", model_kwargs={})
    with pytest.raises(ConfigError, match="NaFlexVit"):
        resolve(cfg.validate(), {"CPU": 2})


def test_the_loaders_give_patch_batches_that_the_model_takes():
    import timm

    from raytrain_cls.data import build_loaders, build_source
    from raytrain_cls.run.driver import resolve

    cfg = naflex_config(mixup=0.8, naflex_patch_sizes=[2, 4], naflex_patch_size_probs=[1, 3])
    with pytest.raises(ConfigError, match="enable_patch_interpolator"):  # the model must resize its embedding
        resolve(cfg.validate(), {"CPU": 2})
    cfg.model.model_kwargs["enable_patch_interpolator"] = True
    resolve(cfg.validate(), {"CPU": 2})
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved.data_config, 0, 2)
    loaders.set_epoch(0)
    model = timm.create_model(cfg.model.model, num_classes=10, in_chans=1, **cfg.model.model_kwargs)
    lengths, patch_pixels = set(), set()
    for i, (x, y) in enumerate(loaders.train):
        n, seq_len = x["patches"].shape[:2]
        lengths.add(seq_len)
        patch_pixels.add(math.prod(x["patches"].shape[2:]))
        assert y.shape == (n, 10) and n * seq_len <= 8 * 36  # soft (mixed) targets; the token budget
        if i < 2:
            assert model(x).shape == (n, 10)
    assert lengths == set(SEQ_LENS) and patch_pixels == {4, 16}  # 2x2 and 4x4 patches, one grey channel
    assert loaders.samples_after(len(loaders.train)) == 1438
    x, y = next(iter(loaders.val))
    assert x["patches"].shape == (8, 16, 16) and y.dtype == torch.int64  # validation: one fixed length


def test_the_naflex_job_config_builds_a_model_that_takes_its_batches():
    from pathlib import Path

    from raytrain_cls.core.config import load_config
    from raytrain_cls.core.model import meta_model
    from raytrain_cls.run.preflight import naflex_model_patch_size

    cfg = load_config(str(Path(__file__).parents[2] / "jobs" / "fashion_mnist_naflexvit.yaml"))
    assert cfg.data.naflex_loader and naflex_model_patch_size(cfg, meta_model(cfg, 10)) == 4
