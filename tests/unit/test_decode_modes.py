"""Every image mode Pillow opens decodes to the 8-bit RGB pixels of the same picture: 16-bit, 32-bit and float
images are scaled, not clipped (Pillow's convert("RGB") turns a 16-bit PNG into black and white), and alpha is
dropped the way it always was. One 8-bit grey picture is the reference; each test derives a twin in another mode,
encodes it as a file, decodes it with decode_image (the decoder training, evaluation and prediction share) and
compares pixel by pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raytrain_cls.data.device_transform import _decode_with_pil
from raytrain_cls.data.samples import read_sample
from raytrain_cls.data.sources import BadImageError, FileImages, decode_image, grey_to_uint8, to_rgb8

HEIGHT, WIDTH = 28, 24


def reference_levels() -> np.ndarray:
    """A digit-like 8-bit picture: a horizontal 0..255 gradient as background and a bright ring (a '0') drawn at
    255, so every level occurs and about a fifth of the pixels are full white (the bug made that two thirds)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    levels = np.rint(x * 255.0 / (WIDTH - 1) * (y % 4 != 0)).astype(np.uint8)  # dark scan lines keep 0s around
    ring = np.hypot((y - HEIGHT / 2) / 10.0, (x - WIDTH / 2) / 7.0)
    levels[(ring > 0.7) & (ring < 1.0)] = 255
    return levels


LEVELS = reference_levels()


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def decoded_rgb(data: bytes) -> np.ndarray:
    img = decode_image(data, "test image")
    assert img.mode == "RGB" and img.size == (WIDTH, HEIGHT)
    return np.asarray(img).astype(np.int64)


def decoded(data: bytes) -> np.ndarray:
    """The decoded grey levels, after checking that the three channels agree (a grey picture stays grey)."""
    pixels = decoded_rgb(data)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def opened_mode(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return img.mode


REFERENCE = decoded(encode(Image.fromarray(LEVELS, "L")))


def test_the_reference_decodes_to_its_own_levels():
    assert (REFERENCE == LEVELS).all()
    assert 0.1 < (LEVELS == 255).mean() < 0.3 and (LEVELS == 0).any()


# ---- more than 8 bits: scaled, exactly where the values are 257 * v ------------------------------------------------
def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(LEVELS.astype(np.uint16) * 257))


def test_a_16_bit_png_decodes_to_the_8_bit_pixels():
    data = sixteen_bit_png()
    assert opened_mode(data) in ("I;16", "I")  # which one depends on the Pillow version; both must scale
    assert (decoded(data) == LEVELS).all()


def test_a_16_bit_png_has_as_many_white_pixels_as_the_8_bit_one():
    white = (decoded(sixteen_bit_png()) == 255).mean()
    assert white == (REFERENCE == 255).mean() < 0.3


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_every_16_bit_byte_order(mode):
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    img = Image.frombytes(mode, (WIDTH, HEIGHT), (LEVELS.astype(np.uint16) * 257).astype(dtype).tobytes())
    assert (np.asarray(to_rgb8(img))[..., 0] == LEVELS).all()


def test_a_big_endian_16_bit_tiff():
    img = Image.frombytes("I;16B", (WIDTH, HEIGHT), (LEVELS.astype(">u2") * 257).tobytes())
    data = encode(img, "TIFF")
    assert opened_mode(data) == "I;16B"
    assert (decoded(data) == LEVELS).all()


def test_a_32_bit_image_holding_16_bit_values_is_read_as_16_bit():
    data = encode(Image.fromarray(LEVELS.astype(np.int32) * 257), "TIFF")  # how older Pillows open a 16-bit PNG
    assert opened_mode(data) == "I"
    assert (decoded(data) == LEVELS).all()


def test_a_32_bit_image_with_larger_values_is_scaled_from_the_32_bit_range():
    data = encode(Image.fromarray(LEVELS.astype(np.int32) * (2**23)), "TIFF")  # 255 * 2**23 is just under 2**31
    assert opened_mode(data) == "I"
    assert np.abs(decoded(data) - LEVELS).max() <= 1


def test_a_float_image_of_fractions_is_scaled_by_255():
    data = encode(Image.fromarray(LEVELS.astype(np.float32) / 255), "TIFF")  # PNG holds no floats
    assert opened_mode(data) == "F"
    assert (decoded(data) == LEVELS).all()


def test_a_float_image_of_levels_is_taken_as_is():
    data = encode(Image.fromarray(LEVELS.astype(np.float32)), "TIFF")
    assert (decoded(data) == LEVELS).all()


def test_scaling_rules_at_the_edges():
    assert grey_to_uint8(np.array([[0, 128, 257, 65535]], np.uint16), "I;16").tolist() == [[0, 0, 1, 255]]
    assert grey_to_uint8(np.array([[-7, 0, 65535]], np.int32), "I").tolist() == [[0, 0, 255]]
    assert grey_to_uint8(np.array([[0, 65536, 2**31 - 1]], np.int32), "I").tolist() == [[0, 0, 255]]
    assert grey_to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32), "F").tolist() == [[0, 128, 255]]
    # out of [0, 1]: taken as levels and clipped; NaN and -inf become 0, +inf 255
    floats = np.array([[-3.0, 127.6, 300.0, np.nan, -np.inf, np.inf]], np.float32)
    assert grey_to_uint8(floats, "F").tolist() == [[0, 128, 255, 0, 0, 255]]


# ---- 8-bit modes: Pillow's convert, alpha dropped -------------------------------------------------------------------
def with_alpha(alpha: int) -> np.ndarray:
    return np.full_like(LEVELS, alpha)


FILE_TWINS = {
    "LA.png": lambda: encode(Image.fromarray(np.dstack([LEVELS, with_alpha(255)]), "LA")),
    "P.png": lambda: encode(Image.fromarray(LEVELS, "L").convert("P")),
    "PA.tiff": lambda: encode(Image.fromarray(LEVELS, "L").convert("PA"), "TIFF"),
    "RGB.png": lambda: encode(Image.fromarray(LEVELS, "L").convert("RGB")),
    "RGBA.png": lambda: encode(Image.fromarray(LEVELS, "L").convert("RGBA")),
    "CMYK.tiff": lambda: encode(Image.fromarray(LEVELS, "L").convert("CMYK"), "TIFF"),
    "YCbCr.tiff": lambda: encode(Image.fromarray(LEVELS, "L").convert("YCbCr"), "TIFF"),
    "RGBX.tiff": lambda: encode(Image.fromarray(LEVELS, "L").convert("RGBX"), "TIFF"),
    "L.tiff": lambda: encode(Image.fromarray(LEVELS, "L"), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(FILE_TWINS))
def test_8_bit_modes_decode_to_the_same_pixels(name):
    data = FILE_TWINS[name]()
    assert opened_mode(data) == name.split(".")[0].replace("RGBX", "RGB")  # Pillow's TIFF reader opens RGBX as RGB
    assert (decoded(data) == LEVELS).all()


def test_lab_decodes_within_pillows_own_rounding():
    data = encode(Image.fromarray(LEVELS, "L").convert("LAB"), "TIFF")
    assert opened_mode(data) == "LAB"
    # Pillow's own L -> LAB -> RGB round trip, not our scaling: a level off here and there, slightly tinted
    assert np.abs(decoded_rgb(data) - LEVELS[..., None]).max() <= 1


def test_a_1_bit_image_decodes_to_black_and_white():
    bits = LEVELS >= 128
    data = encode(Image.fromarray(bits))
    assert opened_mode(data) == "1"
    assert (decoded(data) == np.where(bits, 255, 0)).all()


@pytest.mark.parametrize("fmt", ["LA", "RGBA"])
def test_alpha_is_dropped_not_composited(fmt):
    """As Pillow's convert("RGB") always did for RGBA: a fully transparent pixel keeps its colour."""
    grey = Image.fromarray(np.dstack([LEVELS, with_alpha(0)]), "LA")
    assert (decoded(encode(grey.convert(fmt))) == LEVELS).all()


def test_a_transparent_palette_colour_is_dropped_too():
    data = encode(Image.fromarray(LEVELS, "L").convert("P"), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        buf = io.BytesIO()
        img.save(buf, format="PNG", transparency=int(np.asarray(img)[0, 0]))
    assert (decoded(buf.getvalue()) == LEVELS).all()


@pytest.mark.parametrize("mode", ["RGBa", "La", "HSV"])
def test_modes_only_held_in_memory(mode):
    """No file format here writes these; to_rgb8 still handles them (La needs a detour through LA)."""
    source = Image.fromarray(np.dstack([LEVELS, LEVELS, LEVELS, with_alpha(255)]), "RGBA")
    img = source.convert(mode) if mode != "HSV" else source.convert("RGB").convert("HSV")
    assert img.mode == mode
    assert (np.asarray(to_rgb8(img)) == np.dstack([LEVELS] * 3)).all()


# ---- the same decode everywhere, and the guards kept -----------------------------------------------------------------
def test_a_grey_model_reads_a_16_bit_file_as_its_8_bit_levels(tmp_path):
    path = tmp_path / "sixteen.png"
    path.write_bytes(sixteen_bit_png())
    img, label = read_sample(FileImages([path], [3]), 0, "L")
    assert img.mode == "L" and label == 3 and (np.asarray(img) == LEVELS).all()


def test_the_gpu_decode_paths_pil_fallback_scales_the_same_way():
    tensor = _decode_with_pil(sixteen_bit_png())
    assert tuple(tensor.shape) == (3, HEIGHT, WIDTH) and (tensor.numpy() == LEVELS).all()


def test_a_16_bit_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(BadImageError, match="more than --max-image-pixels"):
        decode_image(sixteen_bit_png(), "big.png", max_pixels=WIDTH * HEIGHT - 1)


def test_a_truncated_16_bit_png_is_a_bad_image():
    data = sixteen_bit_png()
    with pytest.raises(BadImageError) as info:
        decode_image(data[: len(data) // 2], "cut.png")
    assert info.value.where == "cut.png" and info.value.reason
