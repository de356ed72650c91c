"""The --gpu-decode path (data/device_transform.py) on the CPU device: decoding, bad inputs, and augmentation
semantics against timm's create_transform (the CPU path), sample by sample under the same seeds."""

import io
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from raytrain_cls.core.config import Config
from raytrain_cls.data.device_transform import (
    BadImage,
    DeviceTransform,
    build_device_transform,
    decode_batch,
    device_transform_kwargs,
    random_resized_crop_box,
    read_header,
)
from raytrain_cls.data.transforms import transform_kwargs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ONE_LEVEL = 1 / 255 / min(STD)  # one 8-bit level after normalization: 0.0175


def photo(height: int, width: int, seed: int) -> Image.Image:
    """Smooth, photo-like RGB content (gradients, blobs, mild noise): realistic JPEG sizes and non-trivial
    resampling, unlike white noise."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        110
        + 80 * np.sin(x / r.uniform(8, 40) + r.uniform(0, 6)) * np.cos(y / r.uniform(8, 40) + c)
        + 40 * (x / width)
        - 30 * (y / height)
        for c in range(3)
    ]
    arr = np.stack(channels, -1) + r.normal(0, 5, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR (CRC fixed up) claims width x height: a decompression bomb's header."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), 13 bytes of fields, CRC (4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def png_with_short_idat() -> bytes:
    """A 64x48 PNG header with too little (valid, CRC-correct) image data: torchvision 0.29's PNG decoder segfaults
    on this ("libpng error: Not enough image data"), so the device path must never hand PNGs to it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = encode(photo(48, 64, seed=1), "PNG")[:33]  # signature + IHDR chunk
    return header + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


BASE = photo(48, 64, seed=0)
PALETTE = BASE.convert("P")
DECODE_CASES = {
    "rgb_png": (encode(BASE, "PNG"), 0),
    "grey_png": (encode(BASE.convert("L"), "PNG"), 0),
    "rgba_png": (encode(Image.fromarray(np.dstack([np.asarray(BASE), np.full((48, 64), 60, np.uint8)])), "PNG"), 0),
    "palette_png": (encode(PALETTE, "PNG", transparency=3), 0),
    "grey_alpha_png": (encode(BASE.convert("LA"), "PNG"), 0),
    "gif": (encode(PALETTE, "GIF"), 0),
    "webp_lossless": (encode(BASE, "WEBP", lossless=True), 0),
    "bmp": (encode(BASE, "BMP"), 0),
    # JPEG: libjpeg builds may differ in IDCT / colour conversion rounding (nvJPEG more so): a few levels.
    "rgb_jpeg": (encode(BASE, "JPEG", quality=90), 3),
    "grey_jpeg": (encode(BASE.convert("L"), "JPEG", quality=90), 3),
    "cmyk_jpeg": (encode(BASE.convert("CMYK"), "JPEG", quality=95), 3),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decode_gives_pil_rgb_pixels(name):
    data, tolerance = DECODE_CASES[name]
    images, bad = decode_batch([as_tensor(data)], "cpu")
    assert bad == []
    out = images[0].permute(1, 2, 0).numpy().astype(np.int16)
    assert out.shape == (48, 64, 3)
    diff = np.abs(out - pil_rgb(data))
    assert diff.max() <= tolerance, f"{name}: max diff {diff.max()}"
    assert diff.mean() <= tolerance / 4


@pytest.mark.parametrize("name", ["rgb_png", "palette_png", "rgba_png", "rgb_jpeg"])
def test_decode_grey_mode_equals_pil_convert_l(name):
    data, tolerance = DECODE_CASES[name]
    (img,), bad = decode_batch([data], "cpu", mode="L")  # bytes are accepted as well as tensors
    assert bad == [] and img.shape == (1, 48, 64) and img.dtype == torch.uint8
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L")).astype(np.int16)
    assert np.abs(img[0].numpy().astype(np.int16) - expected).max() <= tolerance


def test_bad_inputs_are_reported_and_the_rest_decoded_in_order():
    good = [encode(photo(30 + i, 40, seed=i), fmt) for i, fmt in enumerate(["JPEG", "PNG", "JPEG"])]
    jpeg = good[0]
    batch = [
        good[0],
        jpeg[:-2],  # only the end-of-image marker missing
        jpeg[: len(jpeg) // 2],  # cut in the middle of the scan
        b"",
        b"just some text, not an image at all\n",
        good[1],
        png_claiming(10_000, 9_000),  # 90M pixels: over PIL's 89.5M default, under its hard error
        png_with_short_idat(),
        good[2],
    ]
    reasons = {}
    images, bad = decode_batch([as_tensor(b) for b in batch], "cpu", reasons=reasons)
    assert bad == [1, 2, 3, 4, 6, 7]
    assert sorted(reasons) == bad and "pixels" in reasons[6] and "empty" in reasons[3]
    assert len(images) == 3
    for img, data in zip(images, good):
        expected = pil_rgb(data)
        assert img.shape == (3, *expected.shape[:2])
        assert np.abs(img.permute(1, 2, 0).numpy().astype(np.int16) - expected).max() <= 3


def test_header_check_refuses_truncated_jpegs_before_any_decoder():
    """nvJPEG (and libjpeg builds older than torchvision 0.29's) turn a truncated JPEG into grey pixels with at
    most a warning: the header check must refuse it on its own."""
    data = encode(photo(40, 50, seed=2), "JPEG")
    assert read_header(data).route == "nvjpeg"
    assert read_header(encode(photo(40, 50, seed=2).convert("CMYK"), "JPEG")).route == "libjpeg"
    assert read_header(encode(photo(40, 50, seed=2), "PNG")).route == "pil"
    for cut in (data[:-2], data[: len(data) // 2], data[: len(data) - 40]):
        with pytest.raises(BadImage, match="(?i)truncated"):
            read_header(cut)
    with pytest.raises(BadImage, match="pixels"):
        read_header(png_claiming(10_000, 9_000))


def test_pixel_limit_is_configurable_and_trailing_bytes_are_fine():
    data = encode(photo(40, 50, seed=3), "JPEG")
    _, bad = decode_batch([data, data + b"\x00" * 64 + b"trailer"], "cpu", max_pixels=2000)
    assert bad == []
    _, bad = decode_batch([data], "cpu", max_pixels=1999)
    assert bad == [0]


# ------------------------------------------------------------------------------------------ crop parameters

SHAPES = [(375, 500), (500, 375), (64, 64), (100, 500), (40, 1000), (1000, 30)]  # the last three: fallbacks


def timm_box(height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    return RandomResizedCropAndInterpolation.get_params(torch.empty(1, height, width), scale, ratio)


@pytest.mark.parametrize("height,width", SHAPES)
def test_crop_box_equals_timm_under_the_same_seed(height, width):
    saved = random.getstate()
    try:
        for seed in range(200):
            random.seed(seed)
            expected = timm_box(height, width)
            box = random_resized_crop_box(height, width, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(seed))
            assert (box.top, box.left, box.height, box.width) == expected
    finally:
        random.setstate(saved)


def crop_statistics(boxes, height, width) -> np.ndarray:
    area = np.array([h * w / (height * width) for _, _, h, w in boxes])
    log_ratio = np.array([math.log(w / h) for _, _, h, w in boxes])
    quantiles = (0.1, 0.5, 0.9)
    return np.concatenate(
        [[area.mean()], np.quantile(area, quantiles), [log_ratio.mean()], np.quantile(log_ratio, quantiles)]
    )


@pytest.mark.parametrize("height,width", SHAPES)
def test_crop_distribution_matches_timm(height, width):
    """Independent streams (different seeds) must give the same distribution: area fraction and log aspect
    ratio, mean and 10/50/90% quantiles. 4000 draws: the standard error of these is < 0.01 (area fraction,
    spread <= 0.27) and < 0.005 (log ratio, spread <= 0.17); the tolerance is 0.03."""
    n = 4000
    mine = [random_resized_crop_box(height, width, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(s)) for s in range(n)]
    mine = [(b.top, b.left, b.height, b.width) for b in mine]
    saved = random.getstate()
    try:
        random.seed(12345)
        theirs = [timm_box(height, width) for _ in range(n)]
    finally:
        random.setstate(saved)
    np.testing.assert_allclose(crop_statistics(mine, height, width), crop_statistics(theirs, height, width), atol=0.03)
    for top, left, h, w in mine:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width


# ------------------------------------------------------------------------------------ semantics vs timm

IMAGES = [photo(h, w, seed=10 + i) for i, (h, w) in enumerate([(96, 128), (128, 96), (80, 80), (60, 150)])]
JPEGS = [encode(img, "JPEG", quality=90) for img in IMAGES]
TRAIN_AUG = dict(hflip=0.5, vflip=0.2, color_jitter=0.4, re_prob=0.3, re_mode="const", re_count=2)


def timm_seeded(transform, data: bytes, seed: int) -> torch.Tensor:
    """The CPU path: loader.TransformedDataset seeds python/numpy/torch with the sample seed, then transforms."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(img)


@pytest.fixture
def restore_rngs():
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def paired_train_outputs(input_size, n_seeds, **aug):
    device = DeviceTransform(True, input_size=input_size, mean=MEAN, std=STD, **aug)
    cpu = create_transform(
        input_size=input_size,
        is_training=True,
        mean=MEAN,
        std=STD,
        interpolation=aug.get("train_interpolation", "random"),
        **{k: v for k, v in aug.items() if k != "train_interpolation"},
    )
    ours, theirs = [], []
    for first in range(0, n_seeds, 16):
        seeds = [1000 + s for s in range(first, first + 16)]
        encoded = [JPEGS[s % len(JPEGS)] for s in seeds]
        out, _, bad = device(encoded, torch.zeros(len(seeds), dtype=torch.long), seeds)
        assert bad == []
        ours.append(out)
        theirs.append(torch.stack([timm_seeded(cpu, data, s) for data, s in zip(encoded, seeds)]))
    return torch.cat(ours), torch.cat(theirs)


def levels_apart(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Normalized outputs -> how many 8-bit levels apart each value is."""
    return ((ours - theirs).abs() * torch.tensor(STD).view(1, -1, 1, 1) * 255).round()


def test_train_output_matches_timm_sample_by_sample(restore_rngs):
    """Same seeds -> same crop, interpolation, flips, jitter factors/order and erase boxes as timm's CPU path;
    what is left is resampling rounding (PIL fixed point vs float32: a level here and there), which the jitter
    factors (up to 1.4), the contrast mean (an integer) and the truncations can grow by a few levels. Measured
    over 96 samples: 86% of values equal, 97% within 1 level, 99.6% within 2, the worst single value 5 levels.
    A wrong box, flip, order or factor moves whole regions by tens of levels."""
    ours, theirs = paired_train_outputs((3, 56, 56), 96, **TRAIN_AUG)
    levels = levels_apart(ours, theirs)
    assert (levels == 0).float().mean() > 0.75
    assert (levels > 2).float().mean() < 0.01
    assert levels.max() <= 8


def test_train_statistics_match_timm(restore_rngs):
    """Per-channel mean and std over 160 augmented samples (both interpolations, flips, jitter, erasing) agree to
    0.005 (measured: 1e-4). A systematic shift would not: rounding where PIL truncates moves every jittered
    image by ~0.5 level per op, ~0.02 here."""
    ours, theirs = paired_train_outputs((3, 48, 48), 160, **TRAIN_AUG)
    torch.testing.assert_close(ours.mean((0, 2, 3)), theirs.mean((0, 2, 3)), atol=0.005, rtol=0)
    torch.testing.assert_close(ours.std((0, 2, 3)), theirs.std((0, 2, 3)), atol=0.005, rtol=0)


@pytest.mark.parametrize(
    "input_size,crop_pct,crop_mode,interpolation",
    [
        ((3, 64, 64), 0.875, None, "bicubic"),
        ((3, 56, 72), 0.9, "center", "bilinear"),
        ((3, 64, 64), 1.0, "squash", "bicubic"),
        ((3, 48, 64), 0.95, "border", "bilinear"),
    ],
)
def test_eval_output_close_to_timm(input_size, crop_pct, crop_mode, interpolation):
    """PIL resamples in fixed point and rounds per pass; we resample in float32 and round once: <= 1 level
    apart (measured: exactly 1 level, 0.0175, at worst). Tolerance 2 levels."""
    out, expected = eval_outputs(input_size, crop_pct, crop_mode, interpolation)
    assert (out - expected).abs().max() <= 2 * ONE_LEVEL


def test_eval_nearest_close_to_timm():
    """Nearest picks the same source pixels except at exact ties ((x + 0.5) * in / out an integer), which PIL
    computes in double and torch in float32: there one row/column may take the neighbouring pixel (~2%)."""
    out, expected = eval_outputs((3, 64, 64), 0.875, None, "nearest")
    far = (out - expected).abs() > 2 * ONE_LEVEL
    assert far.float().mean() < 0.05


def eval_outputs(input_size, crop_pct, crop_mode, interpolation):
    device = DeviceTransform(
        False,
        input_size=input_size,
        mean=MEAN,
        std=STD,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation=interpolation,
    )
    cpu = create_transform(
        input_size=input_size,
        is_training=False,
        mean=MEAN,
        std=STD,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation=interpolation,
    )
    out, _, _ = device(JPEGS, torch.arange(len(JPEGS)), list(range(len(JPEGS))))
    expected = torch.stack([cpu(Image.open(io.BytesIO(d)).convert("RGB")) for d in JPEGS])
    assert out.shape == expected.shape == (len(JPEGS), *input_size)
    return out, expected


def test_no_aug_training_matches_timm_noaug_transform():
    kwargs = dict(input_size=(3, 40, 56), mean=MEAN, std=STD)
    device = DeviceTransform(True, no_aug=True, train_interpolation="random", **kwargs)
    cpu = create_transform(is_training=True, no_aug=True, interpolation="random", **kwargs)
    out, _, _ = device(JPEGS, torch.arange(len(JPEGS)), list(range(len(JPEGS))))
    expected = torch.stack([cpu(Image.open(io.BytesIO(d)).convert("RGB")) for d in JPEGS])
    assert (out - expected).abs().max() <= 2 * ONE_LEVEL


def test_grey_model_eval_matches_timm_on_l_images():
    kwargs = dict(input_size=(1, 48, 48), mean=(0.5,), std=(0.25,), interpolation="bilinear")
    device = DeviceTransform(False, **kwargs)
    cpu = create_transform(is_training=False, **kwargs)
    out, _, _ = device(JPEGS, torch.arange(len(JPEGS)), [0] * len(JPEGS))
    expected = torch.stack([cpu(Image.open(io.BytesIO(d)).convert("RGB").convert("L")) for d in JPEGS])
    assert out.shape == (len(JPEGS), 1, 48, 48)
    assert (out - expected).abs().max() <= 2 / 255 / 0.25


# ----------------------------------------------------------------------------------------------- behaviour


def test_labels_follow_inputs_with_bad_samples_removed():
    device = DeviceTransform(True, input_size=(3, 32, 32))
    encoded = [JPEGS[0], b"garbage", JPEGS[1], JPEGS[2][:100], JPEGS[3]]
    out, labels, bad = device(encoded, torch.tensor([10, 11, 12, 13, 14]), [1, 2, 3, 4, 5])
    assert bad == [1, 3]
    assert labels.tolist() == [10, 12, 14]
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32


def test_all_bad_batch_gives_empty_tensors():
    out, labels, bad = DeviceTransform(True, input_size=(3, 32, 32))([b"", b"x"], torch.tensor([1, 2]), [0, 1])
    assert bad == [0, 1] and out.shape == (0, 3, 32, 32) and labels.numel() == 0


def test_same_seeds_same_output_different_seeds_differ(restore_rngs):
    device = DeviceTransform(
        True,
        input_size=(3, 40, 40),
        re_prob=0.5,
        re_mode="pixel",
        **{k: v for k, v in TRAIN_AUG.items() if not k.startswith("re_")},
    )
    labels = torch.arange(4)
    first, _, _ = device(JPEGS, labels, [1, 2, 3, 4])
    torch.rand(3)
    random.random()  # whatever the global RNGs did in between
    again, _, _ = device(JPEGS, labels, [1, 2, 3, 4])
    other, _, _ = device(JPEGS, labels, [5, 6, 7, 8])
    assert torch.equal(first, again)
    for a, b in zip(first, other):
        assert not torch.allclose(a, b, atol=0.1)


def test_transform_leaves_global_rng_streams_alone(restore_rngs):
    device = DeviceTransform(True, input_size=(3, 32, 32), re_prob=1.0, re_mode="pixel")
    random.seed(7)
    torch.manual_seed(7)
    device(JPEGS, torch.arange(4), [1, 2, 3, 4])
    after = random.random(), torch.rand(1).item()
    random.seed(7)
    torch.manual_seed(7)
    assert after == (random.random(), torch.rand(1).item())


def test_hflip_probability_zero_and_one():
    """Whole-image crop of a square image at its own size, no jitter: the output is the image, flipped or not."""
    square = encode(photo(32, 32, seed=5), "PNG")
    common = dict(
        input_size=(3, 32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, train_interpolation="bilinear"
    )
    never, _, _ = DeviceTransform(True, hflip=0.0, **common)([square] * 3, torch.zeros(3), [1, 2, 3])
    always, _, _ = DeviceTransform(True, hflip=1.0, **common)([square] * 3, torch.zeros(3), [1, 2, 3])
    plain, _, _ = DeviceTransform(False, input_size=(3, 32, 32), crop_pct=1.0)([square], torch.zeros(1), [0])
    torch.testing.assert_close(never, plain.expand(3, -1, -1, -1))
    torch.testing.assert_close(always, never.flip(-1))
    assert not torch.allclose(always, never)


def test_random_erasing_probability_one_erases():
    common = dict(input_size=(3, 48, 48), color_jitter=0.0)
    seeds = list(range(20, 28))
    encoded = [JPEGS[i % 4] for i in range(8)]
    clean, _, _ = DeviceTransform(True, **common)(encoded, torch.zeros(8), seeds)
    erased, _, _ = DeviceTransform(True, re_prob=1.0, re_mode="const", **common)(encoded, torch.zeros(8), seeds)
    for c, e in zip(clean, erased):
        changed = (c != e).any(0)
        assert 0.02 * 0.5 <= changed.float().mean() <= 1 / 3 + 0.05  # timm: 2% to 1/3 of the area
        assert torch.all(e[:, changed] == 0)  # 'const' fills with 0 (the mean, after normalization)
        assert torch.equal(c[:, ~changed], e[:, ~changed])


def test_kwargs_mirror_the_cpu_transform_kwargs():
    cfg = Config()
    cfg.aug.reprob, cfg.aug.hflip, cfg.aug.color_jitter, cfg.aug.train_interpolation = 0.25, 0.3, 0.2, "bicubic"
    data_config = dict(
        input_size=(3, 64, 64), mean=MEAN, std=STD, crop_pct=0.9, crop_mode="center", interpolation="bicubic"
    )
    ours, theirs = device_transform_kwargs(cfg, data_config, True), transform_kwargs(cfg, data_config, True)
    renamed = {"train": "is_training", "train_interpolation": "interpolation"}
    for key, value in ours.items():
        if key in ("max_pixels", "interpolation"):
            continue
        assert theirs[renamed.get(key, key)] == value, key
    assert ours["interpolation"] == "bicubic" and ours["max_pixels"] == cfg.data.max_image_pixels
    transform = build_device_transform(cfg, data_config, False, "cpu")
    assert not transform.train and transform.eval_interpolation == "bicubic"
    cfg.aug.aa = "rand-m9-mstd0.5"
    with pytest.raises(ValueError, match="auto-augment"):
        device_transform_kwargs(cfg, data_config, True)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height, width, size", [(28, 28, (32, 32)), (375, 500, (224, 224)), (40, 32, (24, 20))])
def test_batched_crop_resize_equals_resizing_sample_by_sample(interpolation, height, width, size):
    """resize_crops (two matrix products for the batch) against per-sample antialiased interpolate (itself PIL's
    resampling): the same pixels when upscaling; at most one level, on rare rounding ties, when downscaling."""
    from raytrain_cls.data.device_transform import CropBox, resize_crop, resize_crops

    rng = random.Random(height)
    images = [torch.from_numpy(np.asarray(photo(height, width, seed)).transpose(2, 0, 1).copy()) for seed in range(6)]
    boxes = []
    for _ in images:
        h, w = rng.randint(max(1, height // 3), height), rng.randint(max(1, width // 3), width)
        boxes.append(CropBox(rng.randint(0, height - h), rng.randint(0, width - w), h, w))
    batched = resize_crops(images, boxes, size, interpolation)
    single = torch.stack([resize_crop(img, box, size, interpolation) for img, box in zip(images, boxes)])
    diff = (batched - single).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005
    if height <= size[0] and width <= size[1]:
        assert torch.equal(batched, single)
    # images of different sizes share one zero-padded batch; the padding gets no weight
    mixed = resize_crops(
        [images[0][:, : height // 2], *images[1:]], [CropBox(0, 0, height // 2, width), *boxes[1:]], size, interpolation
    )
    assert torch.equal(mixed[1:], batched[1:])
    assert torch.equal(
        mixed[0],
        resize_crops([images[0][:, : height // 2]], [CropBox(0, 0, height // 2, width)], size, interpolation)[0],
    )


def test_equal_size_images_are_resized_for_eval_in_one_batch_like_one_by_one():
    transform = DeviceTransform(train=False, input_size=(3, 24, 24), crop_pct=0.875, interpolation="bicubic")
    images = [torch.from_numpy(np.asarray(photo(30, 40, seed)).transpose(2, 0, 1).copy()) for seed in range(5)]
    together, _ = transform.from_decoded(images, torch.arange(5))
    one_by_one = torch.cat([transform.from_decoded([img], torch.tensor([0]))[0] for img in images])
    assert torch.equal(together, one_by_one)
    as_block, _ = transform.from_decoded(torch.stack(images), torch.arange(5))
    assert torch.equal(as_block, together)


def test_one_huge_image_among_small_ones_gets_its_own_padding_bucket():
    from raytrain_cls.data.device_transform import CropBox, resize_crop, resize_crops, size_buckets

    shapes = [(30, 40)] * 6 + [(3000, 4000)] + [(28, 36)] * 3
    buckets = size_buckets(shapes)
    assert sorted(i for b in buckets for i in b) == list(range(10))
    assert [6] in buckets  # padding the small ones to 3000 x 4000 would be a 10 x 36 MP block
    for bucket in buckets:
        padded = len(bucket) * max(shapes[i][0] for i in bucket) * max(shapes[i][1] for i in bucket)
        assert padded <= 2 * sum(shapes[i][0] * shapes[i][1] for i in bucket)
    images = [
        torch.from_numpy(np.asarray(photo(h, w, seed)).transpose(2, 0, 1).copy())
        for seed, (h, w) in enumerate([(30, 40), (300, 400), (28, 36)])
    ]
    boxes = [CropBox(2, 3, 20, 30), CropBox(10, 20, 250, 300), CropBox(0, 0, 28, 36)]
    batched = resize_crops(images, boxes, (24, 24), "bicubic")
    single = torch.stack([resize_crop(img, box, (24, 24), "bicubic") for img, box in zip(images, boxes)])
    assert (batched - single).abs().max() <= 1
