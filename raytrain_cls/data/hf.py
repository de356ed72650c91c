"""Hugging Face data sets as a source: timm's ``--dataset hfds/NAME`` with ``--input-key`` / ``--target-key``.

NAME is a data set saved with ``save_to_disk``, a local folder of data files (Parquet, an image folder, ...) that
``datasets.load_dataset`` reads, or a Hub name already in the cache (``--data-dir`` is the cache folder, as timm's
root). Loading is offline unless ``--dataset-download`` is given, so a run never downloads by surprise; with it,
a Hub data set is fetched on every node that builds the source (the driver and each worker), into --data-dir.
Images stay encoded in the Arrow table and are decoded by our guarded decoder (bad images skipped and counted);
labels come from a ClassLabel column's names, else from the training split's distinct values, and validation
is labelled through the training class list.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np

from raytrain_cls.core.datasets import HF_PREFIX
from raytrain_cls.data.sources import (
    SPLIT_SYNONYMS,
    BadImageError,
    DataError,
    ImageDataset,
    Source,
    decode_image,
    load_class_map,
)


class HfImages(ImageDataset):
    """One split of a Hugging Face data set; the image column is read undecoded (bytes or a file path)."""

    def __init__(self, dataset, image_key: str, targets: np.ndarray, name: str):
        self.dataset, self.image_key, self.targets, self.name = dataset, image_key, targets, name

    def encoded(self, index: int) -> tuple[bytes, int]:
        image = self.dataset[index][self.image_key]
        try:
            if image.get("bytes"):
                return image["bytes"], int(self.targets[index])
            return Path(image["path"]).read_bytes(), int(self.targets[index])
        except (OSError, TypeError) as e:
            raise BadImageError(self.describe(index), f"{type(e).__name__}: {e}") from None

    def __getitem__(self, index: int):
        data, label = self.encoded(index)
        return decode_image(data, self.describe(index), self.max_pixels), label

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


@contextlib.contextmanager
def hub_access(allowed: bool):
    """Offline unless allowed: both switches that datasets and huggingface_hub read when they are called."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = saved[0] if allowed else True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def load_splits(name: str, cache_dir: Optional[str], download: bool) -> dict:
    """{split name: Dataset} of a saved data set, a local data folder, or a (cached) Hub data set."""
    import datasets

    if Path(name, "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(name))
    with hub_access(download):
        try:
            loaded = datasets.load_dataset(name, cache_dir=cache_dir)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            hint = (
                ""
                if download
                else (" (loading is offline: add --dataset-download to fetch it from the Hub, or give a local folder)")
            )
            raise DataError(f"cannot load the Hugging Face data set {name!r}: {e}{hint}") from None
    return dict(loaded)


def find_split(splits: dict, name: str, wanted: str) -> str:
    found = next((s for s in SPLIT_SYNONYMS.get(wanted, (wanted,)) if s in splits), None)
    if found is None:
        raise DataError(f"the Hugging Face data set {name!r} has no '{wanted}' split (it has {sorted(splits)})")
    return found


def load_hf_source(cfg) -> Source:
    import datasets

    d = cfg.data
    name = d.dataset[len(HF_PREFIX) :]
    image_key, target_key = d.input_key or "image", d.target_key or "label"
    splits = load_splits(name, d.data_dir, d.dataset_download)
    train_name, val_name = find_split(splits, name, d.train_split), find_split(splits, name, d.val_split)
    train, val = splits[train_name], splits[val_name]
    for split, ds in ((train_name, train), (val_name, val)):
        missing = [k for k in (image_key, target_key) if k not in ds.column_names]
        if missing:
            raise DataError(
                f"the {split} split of {name!r} has no column {missing[0]!r} (its columns: "
                f"{ds.column_names}): set --input-key / --target-key"
            )
    feature = train.features[target_key]
    if isinstance(feature, datasets.ClassLabel):
        source_names = list(feature.names)
        values = [np.asarray(ds[target_key]) for ds in (train, val)]
        labels = [[source_names[v] for v in vals.tolist()] for vals in values]
    else:
        labels = [[str(v) for v in ds[target_key]] for ds in (train, val)]
        source_names = sorted(set(labels[0]), key=_natural)
    classes = _pinned_classes(d.class_map, source_names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for split in labels for lab in split} - set(index))
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} of {name!r} are not among the training classes "
            f"{classes[:10]}{'...' if len(classes) > 10 else ''}"
        )
    sets = []
    for split, ds, labs in ((train_name, train, labels[0]), (val_name, val, labels[1])):
        ds = ds.cast_column(image_key, datasets.Image(decode=False))
        sets.append(
            HfImages(ds, image_key, np.asarray([index[lab] for lab in labs], dtype=np.int64), f"{name}:{split}")
        )
    return Source(sets[0], sets[1], classes)


def _pinned_classes(class_map: Optional[str], found: list) -> list:
    if not class_map:
        return found

    return load_class_map(class_map)


def _natural(label: str):
    """Numeric labels in numeric order (2 before 10), others alphabetically."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)
