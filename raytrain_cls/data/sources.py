"""Data sets as (PIL image, class index) sequences: sklearn digits, Fashion-MNIST IDX files, ImageFolder trees.

A source is built the same way on every Ray worker from the config alone (no data travels through Ray's object
store), and every source gives validation samples labels through the *training* class list, never by sorting
each split on its own.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import lzma
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from raytrain_cls.core.config import DEFAULT_MAX_IMAGE_PIXELS, Config
from raytrain_cls.core.errors import UserError
from raytrain_cls.data.shards import MANIFEST, Manifest, ShardError, ShardReader, SplitInfo, read_manifest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# timm searches these names when the requested split folder is missing (timm.data.dataset_factory._search_split).
SPLIT_SYNONYMS = {
    "validation": ("validation", "val", "valid", "test"),
    "val": ("val", "validation", "valid", "test"),
    "train": ("train", "training"),
}


class DataError(UserError, RuntimeError):
    """A data set that cannot be used as configured; the message says what is wrong and how to fix it."""


class BadImageError(DataError):
    """One sample that cannot be decoded (truncated, empty, not an image, too many pixels): skipped and counted."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"cannot read image {where}: {reason}")

    def __reduce__(self):
        # Ray carries a worker's exception to the driver by pickling it, and the default pickling rebuilds it from
        # its message alone, which this __init__ does not take.
        return type(self), (self.where, self.reason), self.__dict__


@dataclass
class Source:
    train: ImageDataset
    val: ImageDataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SIXTEEN_BIT_MAX = 65535
INT32_MAX = 2**31 - 1


def grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """The 8-bit levels of a single-channel image of more than 8 bits (mode I;16*, I or F), scaled, not clipped:
    Pillow's own convert clips these modes to 0..255, which turns a 16-bit image into black and white.

    * I;16, I;16L, I;16B, I;16N (16-bit unsigned): value / 257, rounded, so 65535 -> 255 and 257*v -> v exactly.
    * I (32-bit signed): a 16-bit PNG opens as I or I;16 depending on the Pillow version, so an I image whose values
      all lie in 0..65535 is read as 16-bit (value / 257); one with larger values can only be 32-bit data and is
      scaled from 0..2**31-1. Negative values become 0.
    * F (32-bit float): values all within [0, 1] are taken as fractions (x 255); any other range is taken as 8-bit
      levels already, rounded and clipped to 0..255. NaN becomes 0.
    """
    if mode.startswith("I;16") or mode == "I":
        wide = np.clip(values.astype(np.int64), 0, None)
        sixteen_bit = mode != "I" or wide.size == 0 or wide.max() <= SIXTEEN_BIT_MAX
        top = SIXTEEN_BIT_MAX if sixteen_bit else INT32_MAX
        return ((wide * 255 + top // 2) // top).astype(np.uint8)  # rounded: exact for 257 * v
    if mode == "F":
        floats = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if floats.size and floats.min() >= 0.0 and floats.max() <= 1.0:
            floats = floats * 255.0
        return np.clip(np.rint(floats), 0, 255).astype(np.uint8)
    raise ValueError(f"not a single-channel mode of more than 8 bits: {mode}")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any image Pillow opens, as a new 8-bit RGB image. Modes of more than 8 bits (I;16*, I, F) are scaled by
    grey_to_uint8; every other mode goes through Pillow's convert, which drops alpha (RGBA, LA, PA, P with a
    transparent colour) without compositing it onto a background: the colour channels are kept as they are (the
    premultiplied RGBa and La are un-premultiplied first). Pillow converts La to LA only, so La goes through LA."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(grey_to_uint8(np.asarray(img), img.mode), "L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:  # "conversion from La to RGB not supported"
        return img.convert("LA").convert("RGB")


def decode_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> 8-bit RGB PIL image, fully decoded inside the guard (Image.open alone is lazy and would miss
    a truncated file). Every mode (L, RGBA, CMYK, P, I;16, I, F, ...) is converted by to_rgb8, 16-bit and float
    images scaled rather than clipped; the pixel count is checked from the header before anything is decompressed.
    LOAD_TRUNCATED_IMAGES is never switched on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImageError(
                        where,
                        f"{w}x{h} = {w * h:,} pixels, more than --max-image-pixels "
                        f"{max_pixels:,} (a possible decompression bomb)",
                    )
                img.load()
                return to_rgb8(img)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(where, "empty file" if not data else "not an image in a format Pillow reads") from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        reason = f"{type(e).__name__}: {e}"
        raise BadImageError(where, reason) from None


class ImageDataset:
    """A map-style data set: ``ds[i]`` is (RGB PIL image, label); ``ds.encoded(i)`` is (encoded bytes, label)
    for sources that hold encoded images (the --gpu-decode path). A sample that cannot be decoded raises
    BadImageError naming it (``describe(i)``)."""

    max_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def encoded(self, index: int) -> tuple[bytes, int]:
        raise DataError(f"{type(self).__name__} holds decoded pixels, not encoded images")

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"


class ArrayImages(ImageDataset):
    """Grey uint8 images (N, H, W) held in memory, served as RGB PIL images (timm models take 3 channels)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        self.images, self.targets, self.name = images, np.asarray(labels, dtype=np.int64), name

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), int(self.targets[index])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def array_dataset(images: np.ndarray, labels: np.ndarray, name: str) -> ImageDataset:
    return ArrayImages(images, labels, name)


class FileImages(ImageDataset):
    """Image files on a (local or mounted) file system, one label each."""

    def __init__(self, files: Sequence[Path], targets: Sequence[int]):
        self.files, self.targets = list(files), np.asarray(targets, dtype=np.int64)

    def encoded(self, index: int) -> tuple[bytes, int]:
        try:
            return self.files[index].read_bytes(), int(self.targets[index])
        except OSError as e:
            raise BadImageError(str(self.files[index]), f"{type(e).__name__}: {e}") from None

    def __getitem__(self, index: int):
        data, label = self.encoded(index)
        return decode_image(data, str(self.files[index]), self.max_pixels), label

    def describe(self, index: int) -> str:
        return str(self.files[index])


class ParquetImages(ImageDataset):
    """One split of Parquet shards (see shards.py); each shard is read whole, verified, and cached."""

    def __init__(self, root: str, split: SplitInfo, cache_shards: int = 8):
        self.reader = ShardReader(root, split, cache_shards)
        self._targets: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def targets(self) -> np.ndarray:
        if self._targets is None:
            self._targets = self.reader.labels()
        return self._targets

    def encoded(self, index: int) -> tuple[bytes, int]:
        data, label, _ = self.reader.row(index)
        return data, label

    def __getitem__(self, index: int):
        data, label, path = self.reader.row(index)
        return decode_image(data, f"{path} (row {index} of {self.reader.root})", self.max_pixels), label

    def describe(self, index: int) -> str:
        return f"row {index} of {self.reader.root}"


class SyntheticImages(ImageDataset):
    """Random images for throughput measurements only (never for accuracy): a pool of 64 distinct images and
    their JPEG encodings, sample i = pool[i % 64] with label i % num_classes."""

    POOL = 64

    def __init__(self, num_samples: int, num_classes: int, size: int, seed: int):
        rng = np.random.RandomState(seed)
        self.targets = np.arange(num_samples, dtype=np.int64) % num_classes
        self.pool = [Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(self.POOL)]
        self.jpegs = []
        for img in self.pool:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            self.jpegs.append(buf.getvalue())

    def __getitem__(self, index: int):
        return self.pool[index % self.POOL].copy(), int(self.targets[index])

    def encoded(self, index: int) -> tuple[bytes, int]:
        return self.jpegs[index % self.POOL], int(self.targets[index])


DIGITS_SHAPE = (1797, 65)  # sklearn's digits.csv.gz: 64 pixel values (0..16) and the label per row


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images 1797x8x8 in 0..16, labels): the CSV that ships inside scikit-learn, read with numpy. Importing
    sklearn itself costs ~1.4 s per process (the driver and every worker); its loader is the fallback for a
    release whose file differs."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.shape == DIGITS_SHAPE:
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_source() -> Source:
    """sklearn's 1,797 8x8 digits (installed with scikit-learn): a fixed 80/20 split, independent of --seed."""
    pixels, labels = read_digits()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.RandomState(0).permutation(len(labels))
    n_val = len(labels) // 5
    val, train = order[:n_val], order[n_val:]
    classes = [str(c) for c in range(10)]
    return Source(
        array_dataset(images[train], labels[train], "digits/train"),
        array_dataset(images[val], labels[val], "digits/validation"),
        classes,
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), plain, gzipped or xz-compressed, into a numpy array."""
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: holds {body.size} bytes of data, the header promises {int(np.prod(dims))} (truncated download?)"
        )
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", f"{stem}.xz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz|.xz) not found in {root}. Install the data set with "
        f"`sudo apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}) or pass "
        "--data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )


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
    raise DataError(
        f"no '{split}' split folder in {root} (looked for {list(SPLIT_SYNONYMS.get(split, (split,)))}); "
        "an ImageFolder data set holds train/ and validation/ folders with one sub-folder per class"
    )


def _scan_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_files(split_dir: Path, classes: list[str], pinned: bool = False) -> tuple[list[Path], list[int]]:
    """Every image under each class folder, labelled by its index in ``classes`` (the training class list). With
    a pinned class map a class may have no folder in this split; an existing but empty folder is always an error."""
    files, targets = [], []
    for idx, name in enumerate(classes):
        folder = split_dir / name
        if pinned and not folder.is_dir():
            continue
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"class folder {folder} (class '{name}') holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        targets += [idx] * len(found)
    return files, targets


def load_class_map(path: str) -> list[str]:
    """Class names in index order from timm's .txt (one name per line) or a YAML/JSON list or {name: index}."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".txt"):
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raw = yaml.safe_load(text)  # JSON is YAML
        if isinstance(raw, dict):
            indices = sorted(raw.values()) if all(isinstance(v, int) for v in raw.values()) else None
            if indices != list(range(len(raw))):
                raise DataError(f"class map {path}: the indices must be 0..{len(raw) - 1}, each once")
            names = sorted(raw, key=raw.get)
        elif isinstance(raw, list):
            names = [str(n) for n in raw]
        else:
            raise DataError(f"class map {path}: expected a list of class names or a {{name: index}} mapping")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise DataError(f"class map {path}: " + (f"names {duplicates} appear twice" if names else "no classes"))
    return [str(n) for n in names]


def load_folder_source(data_dir: str, train_split: str, val_split: str, class_map: Optional[str] = None) -> Source:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder")
    if (root / MANIFEST).is_file() and not any((root / name).is_dir() for name in split_names(train_split)):
        raise DataError(f"{root} holds Parquet shards ({MANIFEST}), not an ImageFolder tree: use --dataset parquet")
    train_dir, val_dir = find_split(root, train_split), find_split(root, val_split)
    if class_map:
        classes = load_class_map(class_map)
        for split_dir in (train_dir, val_dir):
            unknown = sorted(set(_scan_classes(split_dir)) - set(classes))
            if unknown:
                raise DataError(f"class folders {unknown} of {split_dir} are not in the class map {class_map}")
    else:
        classes = _scan_classes(train_dir)
        if not classes:
            raise DataError(f"{train_dir} holds no class folders")
        val_classes = _scan_classes(val_dir)
        if set(val_classes) != set(classes):
            missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
            raise DataError(
                f"the classes of {val_dir} differ from those of {train_dir}: missing from validation "
                f"{missing}, only in validation {extra} (a --class-map file pins the classes and "
                "allows splits without some of them)"
            )
    splits = [
        FileImages(*_scan_files(split_dir, classes, pinned=bool(class_map))) for split_dir in (train_dir, val_dir)
    ]
    if len(splits[0]) == 0:
        raise DataError(f"{train_dir} holds no images of the classes in {class_map}")
    return Source(splits[0], splits[1], classes)


def split_names(split: str) -> tuple[str, ...]:
    return SPLIT_SYNONYMS.get(split, (split,))


def prepared_manifest(data_dir: str, train_split: str) -> Optional[Manifest]:
    """The manifest of the shards of ``raytrain-cls prepare`` at ``data_dir``, or None where it holds none (an
    ImageFolder tree; one that merely holds some other tool's manifest.json beside its split folders stays one).
    A URI can only hold shards: ImageFolder trees are read from local or mounted folders. A manifest.json that is
    not a readable one of ours, in a folder without split folders, is neither and raises DataError saying why."""
    if "://" in data_dir:
        try:
            return read_manifest(data_dir)
        except ShardError as e:
            raise DataError(f"{e} (an ImageFolder tree must be a local or mounted folder)") from None
    root = Path(data_dir)
    if not (root / MANIFEST).is_file():
        return None
    try:
        return read_manifest(data_dir)
    except ShardError as e:
        if any((root / name).is_dir() for name in split_names(train_split)):
            return None
        raise DataError(
            f"{e}; {root} has no '{train_split}' split folder either: re-run `raytrain-cls prepare` or point "
            "--data-dir at an ImageFolder tree"
        ) from None


def load_folder_or_shards(data_dir: str, train_split: str, val_split: str, class_map: Optional[str] = None) -> Source:
    """The default data set kind: an ImageFolder tree, or, when ``data_dir`` holds the shards of ``raytrain-cls
    prepare``, those shards, as --dataset parquet would read them. Leaving out --dataset parquet leaves no doubt
    about what to read, so it is read rather than refused."""
    manifest = prepared_manifest(data_dir, train_split)
    if manifest is None:
        return load_folder_source(data_dir, train_split, val_split, class_map)
    if class_map:
        raise DataError(
            f"{data_dir} holds prepared Parquet shards, which carry their own class list: drop --class-map (give it "
            "to `raytrain-cls prepare` when writing the shards)"
        )
    return parquet_source(manifest, data_dir, train_split, val_split)


def read_parquet_manifest(data_dir: str) -> Manifest:
    try:
        return read_manifest(data_dir)
    except ShardError as e:
        raise DataError(str(e)) from None


def manifest_split(manifest: Manifest, data_dir: str, split: str) -> SplitInfo:
    """The manifest's split of that name, or of one of timm's synonyms for it (validation: val, valid, test)."""
    name = next((n for n in split_names(split) if n in manifest.splits), None)
    if name is None:
        raise DataError(f"{data_dir} has no '{split}' split (it has {sorted(manifest.splits)})")
    return manifest.splits[name]


def load_parquet_source(data_dir: str, train_split: str, val_split: str) -> Source:
    return parquet_source(read_parquet_manifest(data_dir), data_dir, train_split, val_split)


def parquet_source(manifest: Manifest, data_dir: str, train_split: str, val_split: str) -> Source:
    train, val = (ParquetImages(data_dir, manifest_split(manifest, data_dir, s)) for s in (train_split, val_split))
    return Source(train, val, manifest.classes)


def synthetic_size(cfg: Config) -> int:
    m = cfg.model
    if m.input_size:
        return int(m.input_size[-1])
    return int(m.img_size or 224)


def load_synthetic_source(cfg: Config) -> Source:
    n, classes = cfg.data.synthetic_samples, cfg.model.num_classes or 1000
    size = synthetic_size(cfg)
    names = [f"class_{i:04d}" for i in range(classes)]
    return Source(
        SyntheticImages(n, classes, size, seed=0), SyntheticImages(max(1, n // 10), classes, size, seed=1), names
    )
