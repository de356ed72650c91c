"""Keeps timm's auto-augment policies working on Pillow 13.

timm's AutoAugment / RandAugment policies can posterize to 0 bits: the 'inc' RandAugment variants at magnitude 10
(reached through magnitude noise, e.g. rand-m9-mstd0.5-inc1) and the v0 AutoAugment sub-policy ('Posterize', 0.8, 2).
Up to Pillow 12 that zeroed the image through a lookup table; Pillow 13 raises ValueError instead, which would kill a
loader worker in the middle of an epoch. timm picks its op from NAME_TO_OP when an AugmentOp is built, so
installing the op below before the transforms are made gives every policy Pillow 12's result on any Pillow.
"""

from __future__ import annotations

from PIL import Image, ImageOps

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with Pillow 12's meaning for 0 bits: every channel value becomes 0."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def install_posterize_fix() -> None:
    from timm.data import auto_augment

    for name in POSTERIZE_OPS:
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize_any_bits
