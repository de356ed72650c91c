"""Data sets as (PIL image, class index) sequences: sklearn digits, Fashion-MNIST IDX files, ImageFolder trees.

A source is built the same way on every Ray worker from the config alone (no data travels through Ray's object
store), and every source gives validation samples labels through the *training* class list, never by sorting
each split on its own.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from ..config import Config, ConfigError, canonical_dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# timm searches these names when the requested split folder is missing (timm.data.dataset_factory._search_split).
SPLIT_SYNONYMS = {"validation": ("validation", "val", "valid", "test"), "val": ("val", "validation", "valid", "test"),
                  "train": ("train", "training")}


class DataError(RuntimeError):
    """A data set that cannot be used as configured; the message says what is wrong and how to fix it."""


@dataclass
class Source:
    train: "ImageDataset"
    val: "ImageDataset"
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageDataset:
    """A map-style data set of (image, label) pairs; ``transform`` turns the PIL image into a tensor."""

    def __init__(self, load: Callable[[int], Image.Image], targets: Sequence[int], describe: Callable[[int], str]):
        self._load, self.targets, self._describe = load, np.asarray(targets, dtype=np.int64), describe
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self._load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def describe(self, index: int) -> str:
        return self._describe(index)


def array_dataset(images: np.ndarray, labels: np.ndarray, name: str) -> ImageDataset:
    """Grey uint8 images (N, H, W) held in memory, served as RGB PIL images (timm models take 3 channels)."""
    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i], mode="L").convert("RGB")
    return ImageDataset(load, labels, lambda i: f"{name}[{i}]")


def load_digits_source() -> Source:
    """sklearn's 1,797 8x8 digits (installed with scikit-learn): a fixed 80/20 split, independent of --seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    n_val = len(labels) // 5
    val, train = order[:n_val], order[n_val:]
    classes = [str(c) for c in bunch.target_names]
    return Source(array_dataset(images[train], labels[train], "digits/train"),
                  array_dataset(images[val], labels[val], "digits/validation"), classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: holds {body.size} bytes of data, the header promises {int(np.prod(dims))} "
                        "(truncated download?)")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the data set with "
                    f"`sudo apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}) or pass "
                    "--data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def load_fashion_mnist_source(data_dir: Optional[str]) -> Source:
    root = Path(data_dir or FASHION_MNIST_DIR)
    parts = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        parts[split] = array_dataset(images, labels, f"fashion_mnist/{split}")
    return Source(parts["train"], parts["val"], list(FASHION_MNIST_CLASSES))


def find_split(root: Path, split: str) -> Path:
    for name in SPLIT_SYNONYMS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"no '{split}' split folder in {root} (looked for {list(SPLIT_SYNONYMS.get(split, (split,)))}); "
                    "an ImageFolder data set holds train/ and validation/ folders with one sub-folder per class")


def _scan_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_files(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, targets = [], []
    for idx, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        targets += [idx] * len(found)
    return files, targets


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the guard: Image.open alone is lazy and misses truncated files
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, ...
        raise DataError(f"cannot read image {path}: {e}") from e


def load_folder_source(data_dir: str, train_split: str, val_split: str) -> Source:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder")
    train_dir, val_dir = find_split(root, train_split), find_split(root, val_split)
    classes = _scan_classes(train_dir)
    if not classes:
        raise DataError(f"{train_dir} holds no class folders")
    val_classes = _scan_classes(val_dir)
    if set(val_classes) != set(classes):
        missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise DataError(f"the classes of {val_dir} differ from those of {train_dir}: missing from validation "
                        f"{missing}, only in validation {extra}")
    splits = []
    for split_dir in (train_dir, val_dir):
        files, targets = _scan_files(split_dir, classes)
        splits.append(ImageDataset(lambda i, f=files: _open_rgb(f[i]), targets, lambda i, f=files: str(f[i])))
    return Source(splits[0], splits[1], classes)


def build_source(cfg: Config) -> Source:
    """The data set the config names; raises DataError (what is wrong, how to fix it) when it cannot be read."""
    d = cfg.data
    kind = canonical_dataset(d.dataset)
    if kind == "digits":
        return load_digits_source()
    if kind == "fashion_mnist":
        return load_fashion_mnist_source(d.data_dir)
    if kind == "folder":
        return load_folder_source(d.data_dir, d.train_split, d.val_split)
    raise ConfigError("data.dataset", d.dataset, "unknown data set")
