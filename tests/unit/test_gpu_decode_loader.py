"""--gpu-decode through build_loaders (on the CPU device here: the same code that runs on a GPU worker, with
torchvision's CPU decoders): the loader processes read bytes only, batches come out decoded, augmented and
normalised, bad files are skipped and counted, and validation matches the CPU path."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.registry import build_source

DATA_CONFIG = {
    "input_size": [3, 24, 24],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def smooth_image(seed: int, size=(40, 32)) -> Image.Image:
    """Photo-like (smooth) content, so JPEG decoders agree closely."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@pytest.fixture()
def tree(tmp_path):
    for split in ("train", "validation"):
        for c, cls in enumerate(("ant", "bee")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(10):
                img = smooth_image(100 * c + i + (0 if split == "train" else 50))
                if i % 2:
                    img.save(d / f"{i}.png")
                else:
                    img.save(d / f"{i}.jpg", quality=95)
    (tmp_path / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    (tmp_path / "validation" / "ant" / "empty.png").write_bytes(b"")
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
                **flat,
            }
        )
        .validate()
    )


def test_gpu_decode_batches_are_normalised_device_tensors(tree):
    cfg = cfg_for(tree, gpu_decode=True)
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1, device="cpu")
    loaders.set_epoch(0)
    batches = list(loaders.train)
    assert len(batches) == 21 // 4
    for x, y in batches:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    dealt = list(loaders.train_sampler)[:20]
    src = build_source(cfg)
    broken_dealt = any(src.train.describe(i).endswith("broken.jpg") for i in dealt)
    assert loaders.train.bad.count == int(broken_dealt)


def test_gpu_decode_validation_matches_the_cpu_path(tree):
    """Same files, same order, same labels; pixels within JPEG/resize differences of PIL + timm's eval transform."""
    gpu = cfg_for(tree, gpu_decode=True)
    cpu = cfg_for(tree)
    a = list(build_loaders(gpu, build_source(gpu), DATA_CONFIG, 0, 1).val)
    b = list(build_loaders(cpu, build_source(cpu), DATA_CONFIG, 0, 1).val)
    xa, ya = torch.cat([x for x, _ in a]), torch.cat([y for _, y in a])
    xb, yb = torch.cat([x for x, _ in b]), torch.cat([y for _, y in b])
    assert torch.equal(ya, yb) and len(ya) == 20  # the empty file skipped on both paths
    # normalised with std 0.25: 0.1 here is ~6 grey levels of 255; smooth images decode almost identically
    print("mean/max abs diff", (xa - xb).abs().mean().item(), (xa - xb).abs().max().item())
    assert (xa - xb).abs().mean() < 0.02 and (xa - xb).abs().max() < 0.25


def test_gpu_decode_augmentation_depends_only_on_seed_epoch_index(tree):
    (tree / "train" / "bee" / "broken.jpg").unlink()  # a refilled batch would shift positions
    cfg = cfg_for(tree, gpu_decode=True)
    src = build_source(cfg)

    def first_batches(world, rank, consumed=0):
        loaders = build_loaders(cfg, src, DATA_CONFIG, rank, world)
        loaders.set_epoch(2, consumed)
        order = list(loaders.train_sampler)
        return {
            order[b * 4 + j]: x[j]
            for b, (x, _) in enumerate(itertools.islice(loaders.train, 2))
            for j in range(x.shape[0])
            if b * 4 + j < len(order)
        }

    one = first_batches(1, 0)
    two = {**first_batches(2, 0), **first_batches(2, 1)}
    common = set(one) & set(two)
    assert len(common) >= 4
    assert all(torch.equal(one[i], two[i]) for i in common)


def test_gpu_decode_needs_encoded_images_and_no_auto_augment():
    with pytest.raises(ConfigError, match="holds decoded pixels"):
        Config().update({"dataset": "digits", "gpu_decode": True}).validate()
    with pytest.raises(ConfigError, match="aug.aa"):
        Config().update({"dataset": "synthetic", "gpu_decode": True, "aa": "rand-m9-mstd0.5"}).validate()


def test_gpu_decode_reads_parquet_shards(tmp_path):
    from raytrain_cls.data.shards import MANIFEST, Manifest, ShardWriter

    w = ShardWriter(str(tmp_path), "train", 4, 2)
    v = ShardWriter(str(tmp_path), "validation", 4, 2)
    for i in range(10):
        buf = io.BytesIO()
        smooth_image(i).save(buf, format="JPEG", quality=90)
        (w if i < 8 else v).add(buf.getvalue(), i % 2, f"{i}.jpg")
    (tmp_path / MANIFEST).write_text(Manifest(["a", "b"], {"train": w.close(), "validation": v.close()}).to_json())
    cfg = (
        Config()
        .update({"dataset": "parquet", "data_dir": str(tmp_path), "batch_size": 4, "workers": 0, "gpu_decode": True})
        .validate()
    )
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1)
    loaders.set_epoch(0)
    assert [x.shape for x, _ in loaders.train] == [(4, 3, 24, 24)] * 2
    assert sum(len(y) for _, y in loaders.val) == 2
