"""raytrain_cls.data.sources: digits, Fashion-MNIST IDX files and ImageFolder trees as (PIL image, label) data sets."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain_cls.core.config import Config
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DataError,
    ParquetImages,
    Source,
    find_split,
    load_digits_source,
    load_fashion_mnist_source,
    load_folder_source,
    read_idx,
)


# ---- digits --------------------------------------------------------------------------------------------------
def test_digits_split_sizes_and_classes():
    """A fixed 80/20 split of sklearn's 1,797 digits, ten classes named '0'..'9'."""
    src = load_digits_source()
    assert (len(src.train), len(src.val)) == (1438, 359)
    assert src.classes == [str(i) for i in range(10)] and src.num_classes == 10


def test_digits_split_is_deterministic():
    a, b = load_digits_source(), load_digits_source()
    np.testing.assert_array_equal(a.train.targets, b.train.targets)
    np.testing.assert_array_equal(a.val.targets, b.val.targets)
    assert np.array_equal(np.asarray(a.train[5][0]), np.asarray(b.train[5][0]))


def test_digits_labels_and_images():
    src = load_digits_source()
    for ds in (src.train, src.val):
        assert set(np.unique(ds.targets)) == set(range(10))  # every class in both splits
    img, label = src.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    assert isinstance(label, int) and 0 <= label <= 9
    pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.max() > 200  # scaled from sklearn's 0..16 to 0..255


def test_digits_split_is_a_partition():
    """Train and validation together hold each of sklearn's samples once (the label histogram adds up)."""
    from sklearn.datasets import load_digits

    src = load_digits_source()
    counts = np.bincount(np.concatenate([src.train.targets, src.val.targets]), minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(load_digits().target, minlength=10))


# ---- Fashion-MNIST IDX ---------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    """The IDX format: 0x00 0x00 <type> <ndim>, big-endian uint32 dims, then the raw bytes."""
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz) -> None:
    """gz: True (or "gz") for name.gz, "xz" for name.xz, False for the plain file."""
    data = idx_bytes(array)
    compressed = {True: "gz", "gz": "gz", "xz": "xz"}.get(gz)
    if compressed:
        path = path.with_name(f"{path.name}.{compressed}")
        with (gzip.open if compressed == "gz" else lzma.open)(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fashion_dir(root: Path, gz: bool = True, n_train: int = 6, n_val: int = 4, size: int = 5) -> dict:
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_val, size, size)),
        "t10k-labels-idx1-ubyte": (np.arange(n_val) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(root / stem, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, "xz", False], ids=["gz", "xz", "raw"])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    arrays = make_fashion_dir(tmp_path, gz=gz)
    src = load_fashion_mnist_source(str(tmp_path))
    assert (len(src.train), len(src.val)) == (6, 4)
    assert src.classes == FASHION_MNIST_CLASSES and src.num_classes == 10
    np.testing.assert_array_equal(src.train.targets, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(src.val.targets, arrays["t10k-labels-idx1-ubyte"])
    img, label = src.val[2]
    assert img.mode == "RGB" and img.size == (5, 5) and label == 6
    np.testing.assert_array_equal(np.asarray(img)[..., 0], arrays["t10k-images-idx3-ubyte"][2])


def test_read_idx_shape_and_values(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(array))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_gz_is_preferred_when_both_exist(tmp_path):
    make_fashion_dir(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage")  # would fail if read
    assert len(load_fashion_mnist_source(str(tmp_path)).train) == 6


@pytest.mark.parametrize(
    "header", [bytes([0, 0, 0x09, 1]), bytes([1, 0, 0x08, 1]), b"PK\x03"], ids=["signed-type", "nonzero-magic", "short"]
)
def test_bad_magic_is_a_data_error(tmp_path, header):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(header + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(path)


def test_truncated_idx_is_a_data_error(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3)))[:-4])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_bad_magic_in_a_data_dir(tmp_path):
    make_fashion_dir(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0b\x03" + b"\x00" * 12)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: not an unsigned-byte IDX file"):
        load_fashion_mnist_source(str(tmp_path))


def test_images_and_labels_must_match(tmp_path):
    make_fashion_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5), gz=False)  # 6 images, 5 labels
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist_source(str(tmp_path))


def test_missing_fashion_mnist_dir_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as info:
        load_fashion_mnist_source(str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "nowhere") in msg


def test_missing_one_file(tmp_path):
    make_fashion_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist_source(str(tmp_path))


def test_build_source_fashion_mnist_data_dir(tmp_path):
    make_fashion_dir(tmp_path)
    cfg = Config().update({"dataset": "fashion-mnist", "data_dir": str(tmp_path)})
    assert len(build_source(cfg).train) == 6


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    src = load_fashion_mnist_source(None)
    assert (len(src.train), len(src.val)) == (60000, 10000)
    assert src.num_classes == 10
    assert set(np.unique(src.train.targets)) == set(range(10)) == set(np.unique(src.val.targets))
    img, _ = src.train[0]
    assert img.size == (28, 28) and img.mode == "RGB"


# ---- ImageFolder ---------------------------------------------------------------------------------------------
COLORS = {"cat": (255, 0, 0), "ant": (0, 255, 0), "dog": (0, 0, 255)}


def make_tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png, each image filled with its class colour."""
    for split, classes in splits.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (6, 4), COLORS.get(cls, (9, 9, 9))).save(d / f"{i}.png")
    return root


def color_class(img: Image.Image) -> str:
    rgb = tuple(int(v) for v in np.asarray(img)[0, 0])
    return next(name for name, c in COLORS.items() if c == rgb)


def test_folder_classes_sorted_and_labels_follow_train_classes(tmp_path):
    make_tree(tmp_path, {"train": {"dog": 2, "cat": 3, "ant": 1}, "validation": {"cat": 1, "dog": 2, "ant": 2}})
    src = load_folder_source(str(tmp_path), "train", "validation")
    assert src.classes == ["ant", "cat", "dog"]
    assert (len(src.train), len(src.val)) == (6, 5)
    for ds in (src.train, src.val):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "RGB" and img.size == (6, 4)
            assert src.classes[label] == color_class(img)  # label names the folder the image came from


def test_folder_val_labels_use_train_class_list(tmp_path):
    """A validation split holding only some classes in a different order still maps names through train's list."""
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 1, "dog": 1}, "validation": {"dog": 2, "ant": 1, "cat": 1}})
    src = load_folder_source(str(tmp_path), "train", "validation")
    assert sorted(src.val.targets.tolist()) == [0, 1, 2, 2]
    assert src.val.describe(0).endswith("0.png")


@pytest.mark.parametrize("folder", ["val", "valid", "test"])
def test_folder_val_synonyms(tmp_path, folder):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 1}, folder: {"ant": 1, "cat": 1}})
    assert find_split(tmp_path, "validation") == tmp_path / folder
    assert len(load_folder_source(str(tmp_path), "train", "validation").val) == 2


def test_folder_exact_split_name_wins(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1}, "validation": {"ant": 2}, "val": {"ant": 1}})
    assert find_split(tmp_path, "validation") == tmp_path / "validation"


def test_folder_missing_val_split(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1}})
    with pytest.raises(DataError, match="no 'validation' split folder"):
        load_folder_source(str(tmp_path), "train", "validation")


def test_folder_data_dir_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_folder_source(str(tmp_path / "missing"), "train", "validation")


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        load_folder_source(str(tmp_path), "train", "validation")


def test_folder_empty_class_folder(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 1}, "validation": {"ant": 1, "cat": 1}})
    for f in (tmp_path / "train" / "cat").iterdir():
        f.unlink()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*cat \(class .cat.\) holds no images"):
        load_folder_source(str(tmp_path), "train", "validation")


def test_folder_val_class_not_in_train(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 1}, "validation": {"ant": 1, "cat": 1, "dog": 1}})
    with pytest.raises(DataError, match=r"only in validation \['dog'\]"):
        load_folder_source(str(tmp_path), "train", "validation")


def test_folder_train_class_missing_from_val(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 1, "dog": 1}, "validation": {"ant": 1, "cat": 1}})
    with pytest.raises(DataError, match=r"missing from validation \['dog'\]"):
        load_folder_source(str(tmp_path), "train", "validation")


def test_folder_ignores_hidden_folders_and_non_images(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 2}, "validation": {"ant": 1}})
    (tmp_path / "train" / ".cache").mkdir()
    (tmp_path / "train" / "ant" / "readme.md").write_text("x")
    src = load_folder_source(str(tmp_path), "train", "validation")
    assert src.classes == ["ant"] and len(src.train) == 2


def test_folder_unreadable_image_is_a_data_error(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1}, "validation": {"ant": 1}})
    (tmp_path / "train" / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    src = load_folder_source(str(tmp_path), "train", "validation")
    bad = next(i for i in range(len(src.train)) if src.train.describe(i).endswith("broken.png"))
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        src.train[bad]


def test_build_source_folder(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 2}, "val": {"ant": 1, "cat": 1}})
    cfg = Config().update({"dataset": "", "data_dir": str(tmp_path)})
    src = build_source(cfg)
    assert src.classes == ["ant", "cat"] and (len(src.train), len(src.val)) == (3, 2)


# ---- prepared shards given without --dataset parquet: read as shards -----------------------------------------------
def prepared_shards(tmp_path: Path) -> Path:
    from raytrain_cls.data.prepare import prepare

    tree = make_tree(tmp_path / "tree", {"train": {"dog": 2, "cat": 3}, "validation": {"cat": 1, "dog": 1}})
    prepare(
        str(tree), str(tmp_path / "shards"), shard_size=2, workers=0, log=lambda m: None, progress_stream=io.StringIO()
    )
    return tmp_path / "shards"


def built(data_dir: str, **options) -> Source:
    return build_source(Config().update({"data_dir": data_dir, **options}))


@pytest.mark.parametrize("dataset", [None, "folder", "imagefolder"])
def test_prepared_shards_without_dataset_parquet_are_read_as_shards(tmp_path, dataset):
    shards = prepared_shards(tmp_path)
    src = built(str(shards), **({} if dataset is None else {"dataset": dataset}))
    as_parquet = built(str(shards), dataset="parquet")
    assert isinstance(src.train, ParquetImages) and isinstance(src.val, ParquetImages)
    assert src.classes == as_parquet.classes == ["cat", "dog"]
    assert (len(src.train), len(src.val)) == (len(as_parquet.train), len(as_parquet.val)) == (5, 2)
    assert src.train.targets.tolist() == as_parquet.train.targets.tolist() == [0, 0, 0, 1, 1]
    img, label = src.train[4]
    assert img.mode == "RGB" and src.classes[label] == color_class(img) == "dog"
    assert src.train.max_pixels == Config().data.max_image_pixels  # set by build_source, as for any source


def test_prepared_shards_at_a_uri_without_dataset_parquet_are_read_as_shards(tmp_path):
    shards = prepared_shards(tmp_path)
    src = built(shards.as_uri())  # file:///...: read through pyarrow's filesystem, as s3:// would be
    assert src.classes == ["cat", "dog"] and (len(src.train), len(src.val)) == (5, 2)
    with pytest.raises(DataError, match="holds no manifest.json.*must be a local or mounted folder"):
        built((tmp_path / "tree").as_uri())


def test_prepared_shards_with_a_class_map_are_refused(tmp_path):
    shards = prepared_shards(tmp_path)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    with pytest.raises(DataError, match="carry their own class list: drop --class-map"):
        built(str(shards), class_map=str(tmp_path / "classes.txt"))


def test_another_tools_manifest_in_an_image_folder_tree_is_ignored(tmp_path):
    make_tree(tmp_path, {"train": {"ant": 1, "cat": 2}, "validation": {"ant": 1, "cat": 1}})
    (tmp_path / "manifest.json").write_text('{"tool": "labelling app"}')
    src = built(str(tmp_path))
    assert src.classes == ["ant", "cat"] and (len(src.train), len(src.val)) == (3, 2)


def test_load_folder_source_itself_names_prepared_shards(tmp_path):
    shards = prepared_shards(tmp_path)
    with pytest.raises(DataError, match="holds Parquet shards .*use --dataset parquet"):
        load_folder_source(str(shards), "train", "validation")


def test_digits_read_from_the_packaged_csv_equal_sklearns_loader_without_importing_sklearn():
    """The CSV inside scikit-learn, read with numpy, is sklearn's load_digits() to the last value; reading it
    does not import sklearn (1.4 s per driver and worker)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from raytrain_cls.data.sources import read_digits

    pixels, labels = read_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    code = (
        "import sys; from raytrain_cls.data.sources import load_digits_source; s = load_digits_source(); "
        "assert len(s.train) == 1438 and len(s.val) == 359; print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
