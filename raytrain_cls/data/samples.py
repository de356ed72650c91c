"""Sample primitives every loader shares: the seed of one augmented sample, the training sampler's keys, reading
one sample (or its stand-in when the image is unreadable), and running a transform under a sample's own seed."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from raytrain_cls.data.sources import BadImageError, ImageDataset

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to spread (seed, epoch, index) over seeds


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    return ((seed * _MIX) ^ (epoch * 0x85EBCA6B) ^ (index * 0xC2B2AE35) ^ (copy * 0x27D4EB2F)) % (2**31)


def split_key(key) -> tuple[int, int, int]:
    """(index, epoch, copy) from a training sampler's key, or a plain index (validation)."""
    if isinstance(key, tuple):
        return key if len(key) == 3 else (*key, 0)
    return key, 0, 0


def split_choice(key) -> tuple[int, int, int, int]:
    """(index, epoch, copy, size choice) from a training key; the choice is 0 unless --train-img-sizes gave one."""
    if isinstance(key, tuple) and len(key) == 4:
        return key
    return (*split_key(key), 0)


def read_sample(base: ImageDataset, index: int, img_mode: str):
    """(PIL image in ``img_mode``, target), or a BadSample standing in for an unreadable image."""
    try:
        img, target = base[index]
    except BadImageError as e:
        return BadSample(e.where, e.reason)
    return (img.convert(img_mode) if img.mode != img_mode else img), target


_kept = 0  # > 0 inside kept_rngs(): the caller restores the RNG streams once for the whole batch


@contextlib.contextmanager
def kept_rngs():
    """The python/numpy/torch RNG streams as they were, after a batch loaded in this process (-j 0): saving and
    restoring them costs ~80 us, so once per batch rather than once per sample inside it (6 % of a digits epoch)."""
    global _kept
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def seeded(fn, *args, seed: int):
    """fn(*args) with python/numpy/torch RNGs seeded by ``seed``. In the training process itself (-j 0) the RNG
    streams are restored afterwards (here, or by an enclosing kept_rngs()), so the training randomness (mixup,
    dropout) does not depend on how the data was loaded; a loader process owns its RNGs and needs no restore."""

    def run():
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also touches CUDA, 100x slower
        return fn(*args)

    if _kept or torch.utils.data.get_worker_info() is not None:
        return run()
    with kept_rngs():
        return run()


@dataclass(frozen=True)
class BadSample:
    """Stands in for a sample that could not be decoded, so the batch can be assembled without it."""

    where: str
    reason: str


def split_bad(samples: list) -> tuple[list, list]:
    """(readable samples, BadSample stand-ins), each in their original order."""
    return [s for s in samples if not isinstance(s, BadSample)], [s for s in samples if isinstance(s, BadSample)]
