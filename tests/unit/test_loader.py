"""raytrain_cls.data.loader: batch shapes and augmentation that depends only on (seed, epoch, sample index)."""

from __future__ import annotations

import itertools

import pytest
import torch

from raytrain_cls.core.config import Config
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.sources import load_digits_source

DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@pytest.fixture(scope="module")
def digits():
    return load_digits_source()


def make_cfg(**flat) -> Config:
    # Default aug (random-resized crop, hflip 0.5, colour jitter 0.4, random interpolation): plenty of randomness.
    return (
        Config()
        .update({"dataset": "digits", "model": "test_resnet", "batch_size": 4, "workers": 0, "seed": 11, **flat})
        .validate()
    )


def samples_by_index(cfg, source, rank, world, epoch, batches=2, consumed=0) -> dict[int, torch.Tensor]:
    """index -> augmented tensor for this rank's first ``batches`` training batches of ``epoch``."""
    loaders = build_loaders(cfg, source, DATA_CONFIG, rank, world)
    loaders.set_epoch(epoch, consumed)
    order = list(loaders.train_sampler)
    out = {}
    for b, (x, _) in enumerate(itertools.islice(loaders.train, batches)):
        for j in range(x.shape[0]):
            out[order[b * x.shape[0] + j]] = x[j]
    return out


def test_batch_shapes(digits):
    cfg = make_cfg(validation_batch_size=5)
    loaders = build_loaders(cfg, digits, DATA_CONFIG, 0, 1)
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    vx, vy = next(iter(loaders.val))
    assert vx.shape == (5, 3, 32, 32) and vy.shape == (5,)
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6  # normalised with mean 0.5, std 0.5


def test_loader_lengths_per_rank(digits):
    """Training drops the last partial batch of each rank's padded share; validation keeps every sample once."""
    cfg = make_cfg(batch_size=8)
    total_val = 0
    for rank in range(3):
        loaders = build_loaders(cfg, digits, DATA_CONFIG, rank, 3)
        assert len(loaders.train) == -(-1438 // 3) // 8
        total_val += sum(len(y) for _, y in loaders.val)
    assert total_val == 359


def test_grey_input_size_gives_one_channel(digits):
    data_config = dict(DATA_CONFIG, input_size=[1, 32, 32], mean=[0.5], std=[0.5])
    loaders = build_loaders(make_cfg(), digits, data_config, 0, 1)
    x, _ = next(iter(loaders.train))
    assert x.shape == (4, 1, 32, 32)


def test_validation_is_deterministic(digits):
    a = next(iter(build_loaders(make_cfg(), digits, DATA_CONFIG, 0, 1).val))[0]
    b = next(iter(build_loaders(make_cfg(seed=99), digits, DATA_CONFIG, 0, 1).val))[0]
    assert torch.equal(a, b)


def test_augmentation_same_for_same_seed_epoch_index(digits):
    cfg = make_cfg()
    a = samples_by_index(cfg, digits, 0, 1, epoch=3)
    torch.manual_seed(12345)  # global RNG state must not matter
    b = samples_by_index(cfg, digits, 0, 1, epoch=3)
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_augmentation_changes_with_epoch_and_seed(digits):
    """The transform really is random: the same sample differs between epochs and seeds."""
    cfg = make_cfg()
    loaders = build_loaders(cfg, digits, DATA_CONFIG, 0, 1)
    ds = loaders.train.dataset
    assert not torch.equal(ds[(5, 0)][0], ds[(5, 1)][0])
    other = build_loaders(make_cfg(seed=12), digits, DATA_CONFIG, 0, 1).train.dataset
    assert not torch.equal(ds[(5, 0)][0], other[(5, 0)][0])
    assert torch.equal(ds[(5, 1)][0], ds[(5, 1)][0])


def test_augmentation_independent_of_loader_processes(digits):
    """workers=0 (main process) and workers=1 (a loader process) produce the same tensors."""
    in_main = samples_by_index(make_cfg(workers=0), digits, 0, 1, epoch=2)
    in_proc = samples_by_index(make_cfg(workers=1), digits, 0, 1, epoch=2)
    assert in_main.keys() == in_proc.keys()
    assert all(torch.equal(in_main[i], in_proc[i]) for i in in_main)


def test_augmentation_independent_of_world_size(digits):
    """A sample augmented on one of two ranks equals the same sample augmented by a single worker."""
    cfg = make_cfg()
    single = samples_by_index(cfg, digits, 0, 1, epoch=1, batches=4)
    rank0 = samples_by_index(cfg, digits, 0, 2, epoch=1)
    rank1 = samples_by_index(cfg, digits, 1, 2, epoch=1)
    both = {**rank0, **rank1}
    assert set(both) <= set(single)  # the first 2 batches of 2 ranks = the first 4 batches of one worker
    assert len(both) == 16
    assert all(torch.equal(both[i], single[i]) for i in both)


def test_resumed_epoch_continues_with_identical_samples(digits):
    """set_epoch(epoch, consumed) picks up the uninterrupted run's sample stream, augmentation included."""
    cfg = make_cfg()
    full = samples_by_index(cfg, digits, 0, 1, epoch=4, batches=3)
    resumed = samples_by_index(cfg, digits, 0, 1, epoch=4, batches=1, consumed=8)
    order = build_loaders(cfg, digits, DATA_CONFIG, 0, 1).train_sampler
    order.set_epoch(4)
    third_batch = list(order)[8:12]
    assert sorted(resumed) == sorted(third_batch)
    assert all(torch.equal(resumed[i], full[i]) for i in resumed)


def test_batch_larger_than_data_is_refused(digits):
    cfg = make_cfg(batch_size=1000)
    with pytest.raises(ValueError, match="batch_size 1000 x 2 workers"):
        build_loaders(cfg, digits, DATA_CONFIG, 0, 2)
    assert len(build_loaders(cfg, digits, DATA_CONFIG, 0, 1).train) == 1  # 1438 samples hold one full batch


def test_aug_repeats_give_each_copy_its_own_augmentation(digits):
    """--aug-repeats 2 on one worker: a batch holds each sample twice, differently augmented, with the same label;
    the same (sample, copy) comes out the same again (the seed includes the copy number)."""
    cfg = make_cfg(aug_repeats=2)
    loaders = build_loaders(cfg, digits, DATA_CONFIG, 0, 1)
    loaders.set_epoch(0)
    order = list(loaders.train_sampler)
    x, y = next(iter(loaders.train))
    assert order[0] == order[1] and order[2] == order[3]
    assert torch.equal(y[0::2], y[1::2])
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[2], x[3])
    again, _ = next(iter(build_loaders(cfg, digits, DATA_CONFIG, 0, 1).train))
    torch.testing.assert_close(again, x)


def test_aug_repeats_need_the_torch_loader():
    from raytrain_cls.core.config import ConfigError

    with pytest.raises(ConfigError, match="aug.aug_repeats.*--loader torch"):
        Config().update({"dataset": "parquet", "data_dir": "/tmp", "loader": "ray", "aug_repeats": 3}).validate()


def test_in_process_loading_keeps_the_rng_streams_and_saves_them_once_per_batch(digits, monkeypatch):
    """-j 0: every sample is augmented under its own seed in the training process; the training RNG streams
    (python, numpy, torch) are as before each batch, saved and restored once per batch, not once per sample."""
    import random

    import numpy as np

    from raytrain_cls.data import samples

    loaders = build_loaders(make_cfg(), digits, DATA_CONFIG, 0, 1)
    loaders.set_epoch(0)
    saves = []
    real = samples.torch.get_rng_state
    monkeypatch.setattr(samples.torch, "get_rng_state", lambda: saves.append(1) or real())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    batches = list(itertools.islice(loaders.train, 3))
    after = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())
    assert len(saves) == 3  # one per batch of 4
    # and the samples are the per-sample seeded ones, whatever loaded them
    by_index = samples_by_index(make_cfg(), digits, 0, 1, 0, batches=3)
    order = list(loaders.train_sampler)
    assert all(torch.equal(x[j], by_index[order[b * 4 + j]]) for b, (x, _) in enumerate(batches) for j in range(4))
