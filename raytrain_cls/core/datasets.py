"""The catalogue of data-set kinds: every name `--dataset` takes, its aliases, and what each kind needs and holds.

The one list config validation, `prepare`, the CLI's choices and the benchmarks read. How each kind is built is the
data layer's part (raytrain_cls.data.registry maps each name here to its builder, and refuses to import when the two
disagree), so this layer names the kinds without importing the data layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HF_PREFIX = "hfds/"  # timm's prefix for a (map-style) Hugging Face data set: hfds/NAME


@dataclass(frozen=True)
class DatasetKind:
    name: str
    summary: str
    aliases: tuple[str, ...] = ()
    preparable: bool = False  # `raytrain-cls prepare` converts it to Parquet shards
    needs_data_dir: bool = False  # meaningless without --data-dir
    encoded: bool = False  # holds encoded image files, which --gpu-decode can decode on the device


KINDS: tuple[DatasetKind, ...] = (
    DatasetKind("digits", "sklearn's bundled 8x8 digits", aliases=("sklearn/digits",), preparable=True),
    DatasetKind(
        "fashion_mnist",
        "Fashion-MNIST IDX files (Debian's dataset-fashion-mnist, or --data-dir)",
        aliases=("torch/fashion_mnist", "fashion-mnist"),
        preparable=True,
    ),
    DatasetKind(
        "folder",
        "an ImageFolder tree at --data-dir (timm's default)",
        aliases=("", "imagefolder"),
        preparable=True,
        needs_data_dir=True,
        encoded=True,
    ),
    DatasetKind(
        "parquet", "Parquet shards written by `prepare`", aliases=("shards",), needs_data_dir=True, encoded=True
    ),
    DatasetKind("synthetic", "random images, for throughput only", encoded=True),
)
HF_KIND = DatasetKind(HF_PREFIX, "a Hugging Face data set saved or cached locally: hfds/NAME", encoded=True)

BY_NAME = {kind.name: kind for kind in KINDS}
ALIASES = {alias: kind.name for kind in KINDS for alias in kind.aliases}
NAMES = tuple(BY_NAME)
PREPARABLE = tuple(kind.name for kind in KINDS if kind.preparable)


def canonical_dataset(name: str) -> str:
    """The kind's own name for any spelling --dataset accepts (aliases, any case)."""
    return ALIASES.get(name.lower(), name.lower())


def dataset_kind(name: str) -> Optional[DatasetKind]:
    """The kind --dataset NAME names, or None for an unknown name."""
    name = canonical_dataset(name)
    return HF_KIND if name.startswith(HF_PREFIX) else BY_NAME.get(name)
