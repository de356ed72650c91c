"""timm's auto-augment policies keep working on every Pillow the project allows (Pillow 13 refuses 0-bit posterize)."""

import random

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data import auto_augment

from raytrain_cls.core.config import Config
from raytrain_cls.data.pillow_compat import posterize_any_bits
from raytrain_cls.data.transforms import build_transform  # importing it installs the fix


def photo(mode="RGB", size=(40, 32), seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    return Image.fromarray(rng.integers(1, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_zero_bit_posterize_from_a_timm_op_gives_a_black_image(mode):
    # 'PosterizeIncreasing' at magnitude 10 keeps 4 - 4 = 0 bits: what rand-...-inc1 reaches with magnitude noise.
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(photo(mode))
    assert out.mode == mode and out.size == (40, 32)
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_other_bit_counts_are_pillows_own(bits):
    img = photo()
    expected = img if bits == 8 else ImageOps.posterize(img, bits)
    assert np.array_equal(np.asarray(posterize_any_bits(img, bits)), np.asarray(expected))


def test_the_v0_policy_with_its_zero_bit_subpolicy_runs_on_many_images():
    # v0 holds ('Posterize', 0.8, 2): int(2 / 10 * 4) = 0 bits, applied to 3.2 % of images (1 of 25 sub-policies,
    # p 0.8); 400 images reach it 16 times for this seed.
    cfg = Config().update({"dataset": "synthetic", "img_size": 32, "aa": "v0", "seed": 0}).validate()
    data_config = {
        "input_size": (3, 32, 32),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    calls = []
    real = auto_augment.NAME_TO_OP["Posterize"]
    try:
        auto_augment.NAME_TO_OP["Posterize"] = lambda img, bits, **kw: calls.append(bits) or real(img, bits, **kw)
        transform = build_transform(cfg, data_config, is_training=True)
        random.seed(0)
        for i in range(400):
            assert transform(photo(seed=i)).shape == (3, 32, 32)
    finally:
        auto_augment.NAME_TO_OP["Posterize"] = real
    assert 0 in calls
