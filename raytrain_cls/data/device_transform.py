"""Decode and augment encoded images on the training device, in batches (the ``--gpu-decode`` path).

With ``--gpu-decode`` the DataLoader processes only read encoded bytes; this module turns a batch of them into the
normalized float batch the model eats, with the augmentation semantics of timm's ``create_transform`` (the CPU
path, ``transforms.py``).

What runs where:

* CPU, per sample, cheap: the header check (PIL reads width/height without decoding; images over ``max_pixels``
  and JPEGs without an end-of-image marker after their last scan are refused), and every random draw. Each
  sample's parameters come from its own ``random.Random(seed)`` and ``torch.Generator().manual_seed(seed)``,
  ``seed = loader.sample_seed(seed, epoch, index)``, drawn in the same order and with the same calls as timm's
  CPU transforms after ``TransformedDataset`` seeds the global RNGs with that seed. So a sample gets the very
  crop box, interpolation, flips, jitter factors/order and erase boxes it would get on the CPU path, whatever
  the worker count or batch composition.
* Device: JPEG decode (nvJPEG, one batched ``torchvision.io.decode_jpeg`` call) when the device is CUDA; crop,
  antialiased resize (one ``interpolate`` per sample: crops differ in size), flips, brightness / contrast /
  saturation (batched per group of samples sharing an op order), scaling to [0, 1], normalization, random
  erasing (timm's ``RandomErasing`` on the normalized batch, as timm's prefetcher applies it). Pixels stay 8-bit
  levels held in float32 until normalization, rounded / truncated where PIL rounds / truncates (resampling,
  ``Image.blend``), so the CPU path's quantization is reproduced rather than shifted. Per-batch parameters go
  to the device from pinned memory; nothing in the hot path waits for the device.
* CPU decode, then a copy to the device: JPEGs when the device is not CUDA and CMYK/YCCK JPEGs (libjpeg through
  torchvision), everything else (PNG, GIF, WebP, BMP, TIFF, ...) with PIL exactly as the CPU path does.
  torchvision 0.29's PNG decoder segfaults on some corrupt PNGs (a valid header with too little IDAT data:
  "libpng error: Not enough image data", then SIGSEGV), which would kill the training process; PIL raises.
  Its JPEG decoder survived the same fuzzing and decodes to PIL's pixels exactly (same libjpeg-turbo).

Differences from the CPU path that remain: resampling weights in float32 vs PIL's fixed point (a pixel may be
one level apart, a few levels after jitter amplifies it), nearest-neighbour ties (float32 vs double), nvJPEG's
IDCT vs libjpeg's (a level or two), and the erase noise of ``re_mode`` 'pixel'/'rand', which comes from the
device RNG (deterministic per sample seed, but not the CPU path's numbers). Hue jitter and auto-augment
(``--aa``, PIL-only ops) are not supported; config validation refuses ``--aa`` with ``--gpu-decode``, and so
does ``device_transform_kwargs``. Call a DeviceTransform from one thread (the training loop): it swaps python's
global ``random`` state while erasing and restores it afterwards.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision.io import ImageReadMode, decode_jpeg

from raytrain_cls.core.config import DEFAULT_MAX_IMAGE_PIXELS, Config
from raytrain_cls.data.sources import to_rgb8

Encoded = Union[torch.Tensor, bytes, bytearray, memoryview]

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SOS = b"\xff\xda"  # start of scan: entropy-coded data follows, in which 0xFF bytes are always stuffed
_JPEG_EOI = b"\xff\xd9"  # end of image
_NVJPEG_MODES = ("RGB", "L")  # JPEG colour spaces sent to nvJPEG; CMYK/YCCK go to libjpeg, which converts them
# PIL's integer RGB -> L weights (ITU-R 601-2, 16-bit fixed point): the CPU path converts grey exactly this way.
_PIL_GREY_WEIGHTS = (19595, 38470, 7471)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


# ----------------------------------------------------------------------------------------------------- decode


class BadImage(Exception):
    """One encoded image that will not be decoded; ``reason`` says why."""


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    route: str  # "nvjpeg": a JPEG nvJPEG can take; "libjpeg": other JPEGs (CMYK, ...); "pil": everything else


def _as_bytes(item: Encoded) -> bytes:
    if isinstance(item, torch.Tensor):
        return item.numpy().tobytes() if item.numel() else b""
    return bytes(item)


def _as_tensor(item: Encoded, data: bytes) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item.contiguous()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _jpeg_is_complete(data: bytes) -> bool:
    """An end-of-image marker after the last start-of-scan. Entropy-coded data cannot contain 0xFF 0xD9, so this
    catches truncated files that some decoders (nvJPEG, older libjpeg builds) would turn into grey pixels with
    only a warning, while still accepting trailing bytes after EOI (camera trailers, padding)."""
    return data.rfind(_JPEG_EOI) > data.rfind(_JPEG_SOS)


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size and decode route from the header alone (nothing is decompressed); raises BadImage."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(io.BytesIO(data)) as img:
                (width, height), mode = img.size, img.mode
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, SyntaxError, ...
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise BadImage(
            f"{width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(a possible decompression bomb)"
        )
    if width == 0 or height == 0:
        raise BadImage(f"empty image {width}x{height}")
    if data.startswith(_JPEG_MAGIC):
        if not _jpeg_is_complete(data):
            raise BadImage("truncated JPEG (no end-of-image marker after the last scan)")
        return ImageHeader(width, height, "nvjpeg" if mode in _NVJPEG_MODES else "libjpeg")
    return ImageHeader(width, height, "pil")


def _decode_with_pil(data: bytes) -> torch.Tensor:
    """The CPU path's own decode (sources.decode_image): every mode converted by sources.to_rgb8, so a 16-bit or
    float image is scaled to 8 bits here exactly as there, not clipped by PIL's convert("RGB")."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = np.array(to_rgb8(img))
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _decode_on_cpu(tensor: torch.Tensor, data: bytes, header: ImageHeader) -> torch.Tensor:
    """(3,H,W) uint8 on the CPU; raises BadImage."""
    try:
        if header.route == "pil":
            img = _decode_with_pil(data)
        else:
            img = decode_jpeg(tensor, mode=ImageReadMode.RGB)
    except Exception as e:
        raise BadImage(f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}") from None
    if tuple(img.shape[-2:]) != (header.height, header.width):
        raise BadImage(f"decoded {img.shape[-1]}x{img.shape[-2]}, header says {header.width}x{header.height}")
    return img


def _decode_jpegs_on_cuda(tensors: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """One batched nvJPEG call; if it raises, one call per image so that only the failing ones are None."""
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:
        pass
    decoded = []
    for tensor in tensors:
        try:
            decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except Exception:
            decoded.append(None)  # the caller retries on the CPU (libjpeg) before calling it bad
    return decoded


def rgb_to_grey(img: torch.Tensor) -> torch.Tensor:
    """(3,H,W) uint8 -> (1,H,W) uint8 with PIL's integer formula, so "L" pixels equal PIL's convert("L")."""
    r, g, b = img.to(torch.int32).unbind(0)
    wr, wg, wb = _PIL_GREY_WEIGHTS
    return ((r * wr + g * wg + b * wb + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def decode_batch(
    encoded: Sequence[Encoded],
    device: Union[str, torch.device],
    mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reasons: Optional[dict[int, str]] = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Decode encoded images (uint8 1-D tensors or bytes) to uint8 (C,H,W) tensors on ``device``.

    Returns (images, bad): ``images`` holds the decodable ones in input order (C = 3 for mode "RGB", 1 for "L"),
    ``bad`` the input indices that could not be decoded (empty, truncated, not an image, over ``max_pixels``).
    Never raises for bad data. If ``reasons`` is given, it is filled with {bad index: why}.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    device = torch.device(device)
    reasons = {} if reasons is None else reasons
    decoded: dict[int, torch.Tensor] = {}
    on_gpu: list[tuple[int, torch.Tensor, bytes, ImageHeader]] = []
    with warnings.catch_warnings():
        # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec on every call; nothing to act on yet.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        for index, item in enumerate(encoded):
            data = _as_bytes(item)
            try:
                header = read_header(data, max_pixels)
                tensor = _as_tensor(item, data)
                if header.route == "nvjpeg" and device.type == "cuda":
                    on_gpu.append((index, tensor, data, header))
                else:
                    decoded[index] = _decode_on_cpu(tensor, data, header).to(device, non_blocking=True)
            except BadImage as e:
                reasons[index] = str(e)
        if on_gpu:
            gpu_images = _decode_jpegs_on_cuda([tensor for _, tensor, _, _ in on_gpu], device)
            for (index, tensor, data, header), img in zip(on_gpu, gpu_images):
                if img is not None and tuple(img.shape) == (3, header.height, header.width):
                    decoded[index] = img
                    continue
                try:  # nvJPEG refuses some valid JPEGs (unusual subsampling, arithmetic coding): libjpeg decides
                    decoded[index] = _decode_on_cpu(tensor, data, header).to(device, non_blocking=True)
                except BadImage as e:
                    reasons[index] = str(e)
    images = [decoded[i] for i in sorted(decoded)]
    if mode == "L":
        images = [rgb_to_grey(img) for img in images]
    return images, sorted(reasons)


# ------------------------------------------------------------------------------------------ parameter draws


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> CropBox:
    """timm's RandomResizedCropAndInterpolation.get_params, drawing from ``rng`` instead of the global ``random``:
    the same calls in the same order, so a Random seeded like the CPU path's global one gives the same box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if crop_w <= width and crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return CropBox(top, left, crop_h, crop_w)
    return _central_fallback_box(height, width, ratio)


def _central_fallback_box(height: int, width: int, ratio: Sequence[float]) -> CropBox:
    """After 10 misses (very elongated images), timm takes the largest central crop within the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_h, crop_w = height, width
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def _jitter_range(value: float) -> Optional[tuple[float, float]]:
    """torchvision ColorJitter's factor range for one scalar strength; None when it is the identity."""
    low, high = max(0.0, 1.0 - value), 1.0 + value
    return None if low == high == 1.0 else (low, high)


@dataclass
class SampleParams:
    """Everything random about one training sample, drawn on the CPU."""

    box: CropBox
    interpolation: str
    hflip: bool = False
    vflip: bool = False
    jitter_order: tuple[int, ...] = ()  # torchvision's permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    jitter_factors: tuple[Optional[float], Optional[float], Optional[float]] = (None, None, None)
    erase_rng: Optional[random.Random] = None  # continues the sample's stream for RandomErasing's boxes
    seed: int = 0


@dataclass(frozen=True)
class ParamDraws:
    """The CPU half of a training DeviceTransform: draws a sample's SampleParams from its seed. Plain data (no
    device tensors), so loader processes can draw ahead of the training process (--data-on-device -j N)."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    train_interpolation: str  # bilinear | bicubic | nearest | random
    hflip: float
    vflip: float
    jitter_enabled: bool
    jitter_ranges: tuple
    erases: bool

    def __call__(self, height: int, width: int, seed: int) -> SampleParams:
        """One training sample's random parameters, in timm's draw order: python ``random`` for the crop box,
        the interpolation and (later) the erase boxes; torch's generator for flips and colour jitter."""
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        box = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        interpolation = (
            rng.choice(("bilinear", "bicubic")) if self.train_interpolation == "random" else self.train_interpolation
        )
        params = SampleParams(box, interpolation, seed=seed, erase_rng=rng if self.erases else None)
        if self.hflip > 0:
            params.hflip = bool(torch.rand(1, generator=gen) < self.hflip)
        if self.vflip > 0:
            params.vflip = bool(torch.rand(1, generator=gen) < self.vflip)
        if self.jitter_enabled:
            order = torch.randperm(4, generator=gen).tolist()
            params.jitter_order = tuple(op for op in order if op != 3)  # hue is never on here
            params.jitter_factors = tuple(
                None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=gen))
                for r in self.jitter_ranges
            )
        return params


# ------------------------------------------------------------------------------------------ device kernels


def resize_crop(img: torch.Tensor, box: CropBox, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 (C,H,W) -> float (C,*size) of 8-bit levels: crop, then resize with antialiasing like PIL."""
    crop = img[:, box.top : box.top + box.height, box.left : box.left + box.width].unsqueeze(0).float()
    return _resize(crop, size, interpolation)[0]


def _filter_weights(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's resampling filters (and torch's antialiased ones): triangle, or Keys' cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_matrices(
    starts: torch.Tensor, lengths: torch.Tensor, out_size: int, in_size: int, interpolation: str
) -> torch.Tensor:
    """(B, out_size, in_size) weights that crop [start, start + length) of an axis and resample it to
    ``out_size`` as PIL does (and torch's antialiased interpolate): the filter widened by the downscaling
    factor, its window clipped to the crop, the weights of each output pixel normalised to sum to 1."""
    device = starts.device
    starts, lengths = starts.to(torch.float64)[:, None, None], lengths.to(torch.float64)[:, None, None]
    scale = lengths / out_size
    widen = scale.clamp(min=1.0)
    support = (1.0 if interpolation == "bilinear" else 2.0) * widen
    centre = (torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    low = torch.trunc(centre - support + 0.5).clamp(min=0.0)
    high = torch.minimum(torch.trunc(centre + support + 0.5), lengths)
    j = torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - starts  # crop coordinates
    weights = _filter_weights((j - centre + 0.5) / widen, interpolation) * ((j >= low) & (j < high))
    return (weights / weights.sum(-1, keepdim=True)).to(torch.float32)


# Images of different sizes are padded to a common size for the batched resize; a bucket is closed once its
# padding would more than double the pixels it holds, so one huge photo among small ones costs its own bucket,
# not a batch-sized block of its size.
MAX_PADDING_FACTOR = 2.0


def resize_crops(
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    boxes: Sequence[CropBox],
    size: tuple[int, int],
    interpolation: str,
) -> torch.Tensor:
    """uint8 (C,H,W) images (a list, or a (B,C,H,W) tensor) -> float (B,C,*size) of 8-bit levels: each image's
    box cropped and resized like PIL, in batched matrix products (per-sample resize_crop launches a few kernels
    per image, which bounds a fast GPU to the host's launch rate). Equal-size images are resized whole, the box
    picked by the weights; otherwise the boxes are cut out (views) and zero-padded, in buckets of similar size
    (MAX_PADDING_FACTOR); padding gets no weight. Bilinear and bicubic only."""
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"batched resizing does bilinear and bicubic, not {interpolation!r}")
    if isinstance(images, torch.Tensor) or len({tuple(img.shape) for img in images}) == 1:
        pixels = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        return _resize_boxes(pixels.float(), [(b.top, b.left, b.height, b.width) for b in boxes], size, interpolation)
    crops = [img[:, b.top : b.top + b.height, b.left : b.left + b.width] for img, b in zip(images, boxes)]
    out = torch.empty((len(crops), crops[0].shape[0], *size), device=crops[0].device)
    for bucket in size_buckets([tuple(c.shape[-2:]) for c in crops]):
        height, width = max(crops[i].shape[-2] for i in bucket), max(crops[i].shape[-1] for i in bucket)
        pixels = crops[0].new_zeros((len(bucket), crops[0].shape[0], height, width), dtype=torch.float32)
        for k, i in enumerate(bucket):
            pixels[k, :, : crops[i].shape[-2], : crops[i].shape[-1]] = crops[i]
        resized = _resize_boxes(pixels, [(0, 0, *crops[i].shape[-2:]) for i in bucket], size, interpolation)
        out[to_device(torch.tensor(bucket), out.device)] = resized
    return out


def size_buckets(shapes: Sequence[tuple[int, int]], factor: float = MAX_PADDING_FACTOR) -> list[list[int]]:
    """Indices of ``shapes`` grouped, smallest first, so that padding each group to its largest height and width
    holds at most ``factor`` times the group's own pixels (a lone outlier gets a group of its own)."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            group = buckets[-1] + [i]
            padded = len(group) * max(shapes[j][0] for j in group) * max(shapes[j][1] for j in group)
            if padded <= factor * sum(shapes[j][0] * shapes[j][1] for j in group):
                buckets[-1] = group
                continue
        buckets.append([i])
    return buckets


def _resize_boxes(
    pixels: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int], interpolation: str
) -> torch.Tensor:
    """Float (B,C,H,W) -> (B,C,*size): (top, left, height, width) of each image resized, two matrix products."""
    device = pixels.device
    box = to_device(torch.tensor(list(boxes), dtype=torch.int64), device)
    rows = resample_matrices(box[:, 0], box[:, 2], size[0], pixels.shape[-2], interpolation)
    cols = resample_matrices(box[:, 1], box[:, 3], size[1], pixels.shape[-1], interpolation)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32's 10-bit mantissa would move pixels by levels
    try:
        out = rows.unsqueeze(1) @ pixels @ cols.transpose(1, 2).unsqueeze(1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out.round_().clamp_(0, 255)


def _resize(batch: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Float (B,C,h,w) in [0, 255] -> (B,C,*size), rounded and clipped to 8-bit levels like PIL's resampling."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch  # 8-bit levels at their own size: every filter gives weight 1 to the pixel itself
    if interpolation == "nearest":
        # PIL's NEAREST samples at pixel centres, which is torch's "nearest-exact" (plain "nearest" shifts by half)
        return F.interpolate(batch, size=size, mode="nearest-exact")
    out = F.interpolate(batch, size=size, mode=interpolation, antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def _center_crop_or_pad(img: torch.Tensor, size: tuple[int, int], fill: Sequence[float]) -> torch.Tensor:
    """torchvision CenterCrop / timm CenterCropOrPad on (C,H,W) or (B,C,H,W): pad (with ``fill``) to at least
    ``size``, then crop at round((H - h) / 2) (Python's round, as they use)."""
    out_h, out_w = size
    h, w = img.shape[-2:]
    if out_h > h or out_w > w:
        pad_h, pad_w = max(out_h - h, 0), max(out_w - w, 0)
        padded = img.new_empty((*img.shape[:-2], h + pad_h, w + pad_w))
        for channel, value in enumerate(fill):
            padded[..., channel, :, :].fill_(value)
        padded[..., pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w] = img
        img, h, w = padded, h + pad_h, w + pad_w
    top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
    return img[..., top : top + out_h, left : left + out_w]


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor of parameters to the device without stalling the host: CUDA copies from pageable memory
    wait for the stream, copies from pinned memory do not (the caching host allocator keeps the buffer alive)."""
    if device.type == "cuda" and values.device.type == "cpu":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def flip_samples(batch: torch.Tensor, samples: list[int], dim: int) -> None:
    """Flip the listed samples of (B,C,H,W) along ``dim`` in place: only those samples are read and written."""
    if samples:
        index = to_device(torch.tensor(samples), batch.device)
        batch.index_copy_(0, index, batch.index_select(0, index).flip(dim))


# Colour jitter on (B,C,H,W) float batches holding 8-bit levels (integers in [0, 255], exact in float32), with
# PIL's arithmetic: the CPU path's torchvision ColorJitter runs PIL's ImageEnhance, i.e. Image.blend, which
# truncates each result to uint8. Rounding instead would shift every jittered image by ~0.5 level per op.


def pil_grey(batch: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L") on 8-bit levels: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32 (< 2^24)."""
    if batch.shape[1] == 1:
        return batch
    r, g, b = batch.unbind(1)
    wr, wg, wb = _PIL_GREY_WEIGHTS
    return torch.floor((r * wr + g * wg + b * wb + 32768.0) / 65536.0).unsqueeze(1)


def pil_blend(degenerate: torch.Tensor, batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) = degenerate + factor * (image - degenerate), computed in
    float, clipped, truncated; factor 1 returns ``batch``."""
    return torch.addcmul(degenerate, factor, batch - degenerate).clamp_(0.0, 255.0).floor_()


def adjust_brightness(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (batch * factor).clamp_(0.0, 255.0).floor_()  # blend with black


def adjust_contrast(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level, rounded to an integer (ImageEnhance.Contrast)."""
    mean = torch.floor(pil_grey(batch).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return pil_blend(mean, batch, factor)


def adjust_saturation(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if batch.shape[1] == 1:
        return batch  # a grey image has no saturation (PIL's ImageEnhance.Color leaves it unchanged)
    return pil_blend(pil_grey(batch), batch, factor)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(
    batch: torch.Tensor, factors: Sequence[Sequence[Optional[float]]], orders: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Brightness / contrast / saturation, in place on (B,C,H,W), with per-sample factors (None: op off) in
    per-sample order. Samples sharing an order (at most 6 groups) are processed together, so each pixel goes
    through each op once; the grouping is decided on the host from host data, with no device sync."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for sample, order in enumerate(orders):
        groups.setdefault(tuple(order), []).append(sample)
    all_factors = torch.tensor([[1.0 if f is None else f for f in row] for row in factors])
    for order, samples in groups.items():
        whole = len(samples) == batch.shape[0]
        index = None if whole else to_device(torch.tensor(samples), batch.device)
        part = batch if whole else batch.index_select(0, index)
        group_factors = to_device(all_factors[samples], batch.device)
        for op_index in order:
            if any(factors[s][op_index] is not None for s in samples):
                part = _JITTER_OPS[op_index](part, group_factors[:, op_index].view(-1, 1, 1, 1))
        if whole:
            batch = part
        else:
            batch.index_copy_(0, index, part)
    return batch


# ------------------------------------------------------------------------------------------------ transform


def _interpolation(name: str) -> str:
    if name not in _INTERPOLATIONS + ("random",):
        raise ValueError(f"interpolation {name!r} is not one of {_INTERPOLATIONS + ('random',)}")
    return name


def _color_jitter_strengths(color_jitter) -> Optional[tuple[float, float, float]]:
    if color_jitter is None:
        return None
    if isinstance(color_jitter, (list, tuple)):
        if len(color_jitter) == 4 and color_jitter[3]:
            raise ValueError("hue jitter is not supported by the device transform")
        if len(color_jitter) not in (3, 4):
            raise ValueError(f"color_jitter needs 3 values (brightness, contrast, saturation), not {color_jitter}")
        return tuple(float(v) for v in color_jitter[:3])
    return (float(color_jitter),) * 3


class DeviceTransform:
    """Batched decode + timm augmentation on ``device``: ``transform(encoded, labels, seeds)`` ->
    (float images (B,C,H,W) normalized, labels, bad input indices), bad samples dropped."""

    def __init__(
        self,
        train: bool,
        input_size: Sequence[int] = (3, 224, 224),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_pct: Optional[float] = None,
        crop_mode: Optional[str] = None,
        interpolation: str = "bilinear",
        no_aug: bool = False,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter=0.4,
        train_interpolation: str = "random",
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
        device: Union[str, torch.device] = "cpu",
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        channels, height, width = (int(v) for v in input_size)
        if channels not in (1, 3):
            raise ValueError(f"input_size needs 1 (grey) or 3 (RGB) channels, not {channels}")
        self.train, self.no_aug = train, no_aug
        self.size = (height, width)
        self.mode = "L" if channels == 1 else "RGB"
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.mean = torch.tensor(_per_channel(mean, channels), device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(_per_channel(std, channels), device=self.device).view(1, -1, 1, 1)
        self.crop_pct = crop_pct or DEFAULT_CROP_PCT
        self.crop_mode = crop_mode or "center"
        if self.crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"crop_mode {crop_mode!r} is not one of center, squash, border")
        self.border_fill = [float(round(255 * m)) for m in _per_channel(mean, channels)]
        self.eval_interpolation = "bilinear" if interpolation == "random" else _interpolation(interpolation)
        strengths = _color_jitter_strengths(color_jitter)
        self.jitter_enabled = strengths is not None  # timm adds ColorJitter (and its randperm draw) even at 0
        self.jitter_ranges = tuple(_jitter_range(v) for v in strengths) if strengths else (None, None, None)
        self.train_interpolation = _interpolation(train_interpolation)
        self.eraser = (
            RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device) if re_prob > 0 else None
        )
        # The CPU half: every random draw of a training sample (plain data, so loader processes can run it too).
        self.draws = ParamDraws(
            tuple(scale),
            tuple(ratio),
            self.train_interpolation,
            float(hflip),
            float(vflip),
            self.jitter_enabled,
            self.jitter_ranges,
            self.eraser is not None,
        )

    @property
    def augments(self) -> bool:
        return self.train and not self.no_aug

    def eval_resize_size(self, height: int, width: int) -> tuple[int, int]:
        """The size timm's eval (or no-aug train) transform resizes an image of this size to, before cropping."""
        out_h, out_w = self.size
        if self.train and self.no_aug:
            return out_h, out_w  # transforms_noaug_train: Resize((H, W)) squashes, its CenterCrop is a no-op
        scale_h, scale_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_h, scale_w
        if self.crop_mode == "border":  # ResizeKeepRatio(longest=1): the longer side fits
            factor = max(height / scale_h, width / scale_w)
            return round(height / factor), round(width / factor)
        if scale_h == scale_w:  # torchvision Resize(int): shorter side to the size, the longer one truncated
            short, long = min(height, width), max(height, width)
            new_long = int(scale_h * long / short)
            return (scale_h, new_long) if height <= width else (new_long, scale_h)
        factor = min(height / scale_h, width / scale_w)  # ResizeKeepRatio(longest=0): the shorter side fits
        return round(height / factor), round(width / factor)

    # ---- device: pixels

    def _train_pixels(
        self, images: Union[torch.Tensor, list[torch.Tensor]], params: list[SampleParams]
    ) -> torch.Tensor:
        batch = self._crops(images, params)
        flip_samples(batch, [i for i, p in enumerate(params) if p.hflip], dim=-1)
        flip_samples(batch, [i for i, p in enumerate(params) if p.vflip], dim=-2)
        if self.jitter_enabled and any(r is not None for r in self.jitter_ranges):
            batch = color_jitter(batch, [p.jitter_factors for p in params], [p.jitter_order for p in params])
        batch = self._normalize(batch.div_(255.0))
        if self.eraser is not None:
            self._erase(batch, params)
        return batch

    def _crops(self, images: Union[torch.Tensor, list[torch.Tensor]], params: list[SampleParams]) -> torch.Tensor:
        """Each sample's crop box resized to the output size: batched per interpolation (resize_crops), per
        sample for nearest."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.interpolation, []).append(i)
        channels = images.shape[1] if isinstance(images, torch.Tensor) else images[0].shape[0]
        if len(groups) == 1 and "nearest" not in groups:
            return resize_crops(images, [p.box for p in params], self.size, params[0].interpolation)
        batch = torch.empty((len(params), channels, *self.size), device=self.device)
        for interpolation, members in groups.items():
            if interpolation == "nearest":
                for i in members:
                    batch[i] = resize_crop(images[i], params[i].box, self.size, interpolation)
                continue
            picked = (
                images[to_device(torch.tensor(members), images.device)]
                if isinstance(images, torch.Tensor)
                else [images[i] for i in members]
            )
            batch[to_device(torch.tensor(members), self.device)] = resize_crops(
                picked, [params[i].box for i in members], self.size, interpolation
            )
        return batch

    def _eval_pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        fill = self.border_fill if self.crop_mode == "border" else [0.0] * len(self.border_fill)
        interpolation = self.eval_interpolation
        if self.train and self.no_aug:  # transforms_noaug_train resizes with the training interpolation
            interpolation = "bilinear" if self.train_interpolation == "random" else self.train_interpolation
        if isinstance(images, torch.Tensor) or len({tuple(img.shape) for img in images}) == 1:
            # One size (a --data-on-device block, a batch of equal photos): one resize for the whole batch.
            pixels = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
            size = self.eval_resize_size(pixels.shape[-2], pixels.shape[-1])
            full = _resize(pixels.float(), size, interpolation)
            return self._normalize(_center_crop_or_pad(full, self.size, fill).div_(255.0))
        resized = []
        for img in images:
            size = self.eval_resize_size(img.shape[-2], img.shape[-1])
            full = _resize(img.unsqueeze(0).float(), size, interpolation)[0]
            resized.append(_center_crop_or_pad(full, self.size, fill))
        return self._normalize(torch.stack(resized).div_(255.0))

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.sub_(self.mean).div_(self.std)

    def _erase(self, batch: torch.Tensor, params: list[SampleParams]) -> None:
        """timm's RandomErasing per sample of the normalized batch (as its prefetcher does for a batch), with
        python's ``random`` set to each sample's own stream and the device RNG seeded by the sample seed; both
        global states are restored afterwards, so training RNG streams (dropout, mixup) are untouched."""
        generator = _device_generator(self.device)
        saved_python, saved_device = random.getstate(), generator.get_state() if generator is not None else None
        try:
            for i, p in enumerate(params):
                random.setstate(p.erase_rng.getstate())
                if generator is not None:
                    generator.manual_seed(p.seed)
                self.eraser(batch[i])
        finally:
            random.setstate(saved_python)
            if generator is not None:
                generator.set_state(saved_device)

    # ---- the whole thing

    def __call__(
        self, encoded: Sequence[Encoded], labels, seeds: Optional[Sequence[int]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Encoded images, their labels and (training) their sample seeds -> (normalized float (B,C,H,W) on the
        device, labels on the device, input indices of the images that could not be decoded and were dropped)."""
        if self.augments and (seeds is None or len(seeds) != len(encoded)):
            raise ValueError("training augmentation needs one sample seed per image (loader.sample_seed)")
        images, bad = decode_batch(encoded, self.device, self.mode, self.max_pixels)
        dropped = set(bad)
        keep = [i for i in range(len(encoded)) if i not in dropped]
        labels = torch.as_tensor(labels)[keep]
        seeds = [seeds[i] for i in keep] if seeds is not None else None
        return (*self.from_decoded(images, labels, seeds), bad)

    def from_decoded(
        self, images: Sequence[torch.Tensor], labels, seeds: Optional[Sequence[int]] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded uint8 (C,H,W) images on the device (C matching the model's input), their labels and (training)
        sample seeds -> (normalized float (B,C,H,W), labels), both on the device. --data-on-device enters here."""
        if self.augments and (seeds is None or len(seeds) != len(images)):
            raise ValueError("training augmentation needs one sample seed per image (loader.sample_seed)")
        labels = to_device(torch.as_tensor(labels), self.device)
        if not len(images):
            return torch.empty((0, len(self.border_fill), *self.size), device=self.device), labels
        if self.augments:
            params = [self.draws(img.shape[-2], img.shape[-1], seed) for img, seed in zip(images, seeds)]
            return self._train_pixels(images, params), labels
        return self._eval_pixels(images), labels

    def from_params(
        self, images: Union[torch.Tensor, Sequence[torch.Tensor]], labels, params: Sequence[SampleParams]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pixels from parameters drawn elsewhere (ParamDraws in loader processes)."""
        return self._train_pixels(images, list(params)), to_device(torch.as_tensor(labels), self.device)


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]  # an RGB mean/std with a grey model: the channels' average
    raise ValueError(f"{len(values)} mean/std values for {channels} channels")


def _device_generator(device: torch.device) -> Optional[torch.Generator]:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None  # other devices: erase noise is random but not reproducible


# ------------------------------------------------------------------------------------------ config adapters


def device_transform_kwargs(cfg: Config, data_config: dict, is_training: bool) -> dict:
    """DeviceTransform keyword arguments; mirrors transforms.transform_kwargs for the CPU path."""
    kwargs = dict(
        train=is_training,
        input_size=tuple(data_config["input_size"]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
        interpolation=data_config["interpolation"],
        max_pixels=cfg.data.max_image_pixels,
    )
    if is_training:
        a = cfg.aug
        if a.aa:
            raise ValueError(f"auto-augment ({a.aa}) runs on PIL images on the CPU: not with --gpu-decode")
        kwargs.update(
            no_aug=a.no_aug,
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            vflip=a.vflip,
            color_jitter=a.color_jitter,
            train_interpolation=a.train_interpolation,
            re_prob=a.reprob,
            re_mode=a.remode,
            re_count=a.recount,
        )
    return kwargs


def build_device_transform(
    cfg: Config, data_config: dict, is_training: bool, device: Union[str, torch.device]
) -> DeviceTransform:
    return DeviceTransform(device=device, **device_transform_kwargs(cfg, data_config, is_training))
