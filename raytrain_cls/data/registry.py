"""The data-source registry: how each kind of data set in the catalogue (raytrain_cls.core.datasets) is built.

`build_source(cfg)` is the one way the project opens a data set (training, evaluation, prediction, benchmarks).
Adding a kind: a DatasetKind in the catalogue, a builder here; importing this module fails while the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.datasets import HF_PREFIX, KINDS, canonical_dataset
from raytrain_cls.data.hf import load_hf_source
from raytrain_cls.data.sources import (
    Source,
    load_digits_source,
    load_fashion_mnist_source,
    load_folder_or_shards,
    load_parquet_source,
    load_synthetic_source,
)

BUILDERS: dict[str, Callable[[Config], Source]] = {
    "digits": lambda cfg: load_digits_source(),
    "fashion_mnist": lambda cfg: load_fashion_mnist_source(cfg.data.data_dir),
    # An ImageFolder tree, or prepare's shards when --data-dir holds them (--dataset parquet left out).
    "folder": lambda cfg: load_folder_or_shards(
        cfg.data.data_dir, cfg.data.train_split, cfg.data.val_split, cfg.data.class_map
    ),
    "parquet": lambda cfg: load_parquet_source(cfg.data.data_dir, cfg.data.train_split, cfg.data.val_split),
    "synthetic": load_synthetic_source,
    HF_PREFIX: load_hf_source,  # hfds/NAME (the datasets package is imported only when one is opened)
}
if set(BUILDERS) != {kind.name for kind in KINDS} | {HF_PREFIX}:
    raise ImportError(f"data kinds without a builder, or builders without a kind: {sorted(BUILDERS)} vs the catalogue")


def build_source(cfg: Config) -> Source:
    """The data set the config names; raises DataError (what is wrong, how to fix it) when it cannot be read."""
    name = canonical_dataset(cfg.data.dataset)
    builder = BUILDERS[HF_PREFIX] if name.startswith(HF_PREFIX) else BUILDERS.get(name)
    if builder is None:
        raise ConfigError("data.dataset", cfg.data.dataset, "unknown data set")
    source = builder(cfg)
    for ds in (source.train, source.val):
        ds.max_pixels = cfg.data.max_image_pixels
    return source
