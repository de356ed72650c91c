"""--data-on-device (data/resident.py) through build_loaders, on the CPU device (the same code a GPU worker runs):
the batches are the --gpu-decode path's to the bit, a resumed epoch continues with exactly the unseen batches,
bad images are skipped and counted every epoch, validation is split exactly, and what cannot work is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.data import DataError
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.resident import check_fits, image_bytes, load_resident

DATA_CONFIG = {
    "input_size": [3, 24, 24],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@pytest.fixture()
def tree(tmp_path):
    """PNGs of two sizes (both paths decode PNG with PIL, so their pixels are the same) and one broken file."""
    rng = np.random.RandomState(0)
    for split in ("train", "validation"):
        for cls in ("ant", "bee"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(9):
                size = (40, 32) if i % 3 else (30, 36)
                Image.fromarray(rng.randint(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR).save(
                    folder / f"{i}.png"
                )
    (tmp_path / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def cfg_for(root, **flat) -> Config:
    return (
        Config()
        .update(
            {
                "dataset": "folder",
                "data_dir": str(root),
                "model": "test_resnet",
                "batch_size": 4,
                "workers": 0,
                "seed": 5,
                "color_jitter": 0.3,
                "reprob": 0.25,
                **flat,
            }
        )
        .validate()
    )


def epoch_batches(cfg, epoch=0, consumed=0, rank=0, world=1, split="train"):
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, rank, world, device="cpu")
    loaders.set_epoch(epoch, consumed)
    return list(getattr(loaders, split)), loaders


def test_batches_are_the_gpu_decode_paths_to_the_bit(tree):
    """Same sampler, same per-sample seeds, same DeviceTransform: only where the pixels come from differs."""
    for epoch in (0, 1):
        resident, r_loaders = epoch_batches(cfg_for(tree, data_on_device=True), epoch)
        streamed, s_loaders = epoch_batches(cfg_for(tree, gpu_decode=True), epoch)
        assert len(resident) == len(streamed) == 19 // 4
        for (xa, ya), (xb, yb) in zip(resident, streamed):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        assert r_loaders.train.bad.count == s_loaders.train.bad.count
    val_a, _ = epoch_batches(cfg_for(tree, data_on_device=True), split="val")
    val_b, _ = epoch_batches(cfg_for(tree, gpu_decode=True), split="val")
    assert torch.equal(torch.cat([x for x, _ in val_a]), torch.cat([x for x, _ in val_b]))


def test_loader_processes_draw_the_same_parameters_and_leave_the_training_rng_alone(tree):
    """-j 2: the per-sample draws move to loader processes; the batches stay the same to the bit, and the
    training process's RNG stream does not depend on the loader (a resumed run must continue it)."""
    torch.manual_seed(0)
    in_process, _ = epoch_batches(cfg_for(tree, data_on_device=True), epoch=2)
    expected = torch.rand(3)
    torch.manual_seed(0)
    drawn_apart, loaders = epoch_batches(cfg_for(tree, data_on_device=True, workers=2), epoch=2)
    assert torch.equal(torch.rand(3), expected)
    assert loaders.train.loader.keys.num_workers == 2
    for (xa, ya), (xb, yb) in zip(in_process, drawn_apart, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_no_aug_training_batches_are_the_gpu_decode_paths_too(tree):
    resident, _ = epoch_batches(cfg_for(tree, data_on_device=True, no_aug=True), epoch=1)
    streamed, _ = epoch_batches(cfg_for(tree, gpu_decode=True, no_aug=True), epoch=1)
    assert len(resident) == len(streamed) == 19 // 4
    for (xa, ya), (xb, yb) in zip(resident, streamed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_seen(tree):
    (tree / "train" / "bee" / "broken.png").unlink()  # a refilled batch would shift what "the same batch" means
    cfg = cfg_for(tree, data_on_device=True)
    full, _ = epoch_batches(cfg, epoch=3)
    done = 2
    rest, _ = epoch_batches(cfg, epoch=3, consumed=done * 4)
    assert len(rest) == len(full) - done
    for (xa, ya), (xb, yb) in zip(full[done:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_bad_images_are_found_once_and_counted_every_epoch(tree):
    cfg = cfg_for(tree, data_on_device=True, batch_size=19)  # one batch holds every training sample
    source = build_source(cfg)
    loaders = build_loaders(cfg, source, DATA_CONFIG, 0, 1, device="cpu")
    assert list(loaders.train.dataset.bad) == [i for i in range(19) if source.train.describe(i).endswith("broken.png")]
    for epoch in (0, 1):
        loaders.set_epoch(epoch)
        ((x, y),) = list(loaders.train)
        assert x.shape[0] == 19  # the broken image's place refilled with a readable one
        assert loaders.train.bad.count == 1 and "broken.png" in loaders.train.bad.examples[0]


def test_two_ranks_split_validation_exactly_and_share_the_training_order(tree):
    cfg = cfg_for(tree, data_on_device=True, batch_size=2)
    labels = [torch.cat([y for _, y in epoch_batches(cfg, rank=r, world=2, split="val")[0]]) for r in (0, 1)]
    whole = torch.cat([y for _, y in epoch_batches(cfg, split="val")[0]])
    assert len(labels[0]) + len(labels[1]) == len(whole) == 18
    assert sorted(torch.cat(labels).tolist()) == sorted(whole.tolist())
    _, loaders = epoch_batches(cfg, rank=1, world=2)
    assert loaders.train.dataset.images.count(None) == 1  # every rank holds the whole training split


def test_grey_images_for_a_one_channel_model_stay_one_channel():
    cfg = (
        Config()
        .update(
            {
                "dataset": "digits",
                "model": "test_resnet",
                "in_chans": 1,
                "batch_size": 8,
                "workers": 0,
                "data_on_device": True,
            }
        )
        .validate()
    )
    data_config = {**DATA_CONFIG, "input_size": [1, 16, 16], "mean": [0.5], "std": [0.25]}
    loaders = build_loaders(cfg, build_source(cfg), data_config, 0, 1, device="cpu")
    loaders.set_epoch(0)
    x, y = next(iter(loaders.train))
    assert x.shape == (8, 1, 16, 16) and loaders.train.dataset.images[0].shape == (1, 8, 8)


def test_one_size_data_sets_are_one_block_on_the_device():
    cfg = Config().update({"dataset": "digits", "model": "test_resnet"}).validate()
    train = build_source(cfg).train
    resident = load_resident(train, range(len(train)), torch.device("cpu"), "RGB")
    assert resident.nbytes == image_bytes(train, 3) == len(train) * 3 * 8 * 8
    first, last = resident.images[0], resident.images[-1]
    assert first.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()  # views of one tensor


def test_more_than_half_the_free_device_memory_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    check_fits(500, torch.device("cuda", 0))
    with pytest.raises(DataError, match=r"--data-on-device: .* 0\.00 GiB of device memory"):
        check_fits(501, torch.device("cuda", 0))


def test_on_cpu_workers_more_than_a_quarter_of_the_hosts_available_memory_is_refused():
    from raytrain_cls.data.resident import available_memory

    available = available_memory(torch.device("cpu"))
    assert available is not None and available > 0  # this host's MemAvailable
    check_fits(available // 8, torch.device("cpu"))
    with pytest.raises(DataError, match=r"--data-on-device: the data set needs about .* GiB of host memory"):
        check_fits(available, torch.device("cpu"))


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"gpu_decode": True}, "data.gpu_decode"),
        ({"loader": "ray", "dataset": "parquet", "data_dir": "/data/shards"}, "data.loader"),
        ({"aa": "rand-m9-mstd0.5"}, "aug.aa"),
        ({"aug_splits": 2}, "aug.aug_splits"),
        ({"naflex_loader": True, "model": "naflexvit_base_patch16_gap"}, "data.naflex_loader"),
    ],
)
def test_what_cannot_run_on_the_device_is_refused_naming_the_key(flat, key):
    cfg = Config().update({"dataset": "digits", "model": "test_resnet", "data_on_device": True, **flat})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()
