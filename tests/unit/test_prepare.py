"""raytrain_cls.data.prepare: sources -> Parquet shards that read back as the very same samples; bad files skipped
and listed; DST replaced only by a complete data set, never a user's unrelated folder. No Ray."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytrain_cls.commands.cli import EXIT_OK, EXIT_USAGE, main
from raytrain_cls.core.config import Config
from raytrain_cls.data import prepare as prepare_module
from raytrain_cls.data.prepare import prepare, resolve_dataset
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.shards import MANIFEST, iter_rows, read_manifest, verify_folder
from raytrain_cls.data.sources import FASHION_MNIST_CLASSES, DataError, load_digits_source, load_fashion_mnist_source

QUIET = dict(log=lambda message: None, progress_stream=io.StringIO())


def run_prepare(src, dst, **kwargs):
    return prepare(str(src), str(dst), **{"workers": 0, **QUIET, **kwargs})


def parquet_source(dst: Path):
    return build_source(Config().update({"dataset": "parquet", "data_dir": str(dst)}))


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(dst.name + "."))


# ---- image trees -----------------------------------------------------------------------------------------------
COLORS = {"ant": (0, 200, 0), "cat": (200, 0, 0), "dog": (0, 0, 200)}


def save_image(path: Path, color, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (7, 5), color).save(path, format=fmt)


def make_tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png|jpg (alternating), each image in its class colour."""
    for split, classes in splits.items():
        for cls, n in classes.items():
            for i in range(n):
                fmt = "PNG" if i % 2 == 0 else "JPEG"
                save_image(root / split / cls / f"{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}", COLORS[cls], fmt)
    return root


def add_bad_files(split_dir: Path) -> dict[str, str]:
    """A truncated JPEG, a zero-byte .jpg and a text file named .png; {relative path: expected reason part}."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (split_dir / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (split_dir / "cat" / "empty.jpg").write_bytes(b"")
    (split_dir / "dog" / "notes.png").write_text("not an image\n")
    prefix = split_dir.name
    return {
        f"{prefix}/cat/truncated.jpg": "",
        f"{prefix}/cat/empty.jpg": "empty file",
        f"{prefix}/dog/notes.png": "not an image",
    }


# ---- digits ----------------------------------------------------------------------------------------------------
def test_digits_round_trip_is_pixel_identical(tmp_path):
    dst = tmp_path / "digits-shards"
    manifest = run_prepare("digits", dst, shard_size=500, workers=2)
    assert read_manifest(str(dst)).to_json() == manifest.to_json()
    verify_folder(str(dst))  # every shard's size and sha256 match the manifest
    assert sorted(manifest.splits) == ["train", "validation"]
    assert manifest.skipped == [] and manifest.source == "digits"

    original, shards = load_digits_source(), parquet_source(dst)
    assert shards.classes == original.classes
    for ours, theirs in ((shards.train, original.train), (shards.val, original.val)):
        assert len(ours) == len(theirs)
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        for i in range(len(theirs)):
            (a, la), (b, lb) = ours[i], theirs[i]
            assert la == lb and a.mode == b.mode == "RGB"
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"sample {i} differs"
    first = next(iter_rows(str(dst), manifest.splits["validation"]))
    assert first[2] == "digits/validation[0]"


def test_shard_size_splits_into_shards(tmp_path):
    manifest = run_prepare("digits", tmp_path / "d", shard_size=500)
    assert manifest.splits["train"].shard_sizes() == [500, 500, 438]
    assert manifest.splits["validation"].shard_sizes() == [359]
    assert [s.file for s in manifest.splits["train"].shards] == [f"train-0000{i}.parquet" for i in range(3)]
    assert sum(manifest.splits["train"].class_counts) == 1438
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        [MANIFEST, "validation-00000.parquet"] + [f"train-0000{i}.parquet" for i in range(3)]
    )


# ---- ImageFolder -----------------------------------------------------------------------------------------------
def test_folder_round_trip_stores_the_original_bytes(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"dog": 3, "cat": 4}, "val": {"cat": 2, "dog": 1}})
    dst = tmp_path / "out"
    manifest = run_prepare(src, dst, shard_size=3)
    verify_folder(str(dst))
    assert manifest.classes == ["cat", "dog"] and manifest.skipped == []
    assert manifest.source == str(src.resolve())
    assert manifest.splits["train"].shard_sizes() == [3, 3, 1]
    assert manifest.splits["train"].class_counts == [4, 3]
    assert manifest.splits["validation"].class_counts == [2, 1]

    rows = {name: list(iter_rows(str(dst), split)) for name, split in manifest.splits.items()}
    # The source's order: per class in class-list order, files sorted.
    assert [r[2] for r in rows["validation"]] == ["val/cat/00.png", "val/cat/01.jpg", "val/dog/00.png"]
    assert [r[2] for r in rows["train"]][:4] == [
        f"train/cat/{i:02d}.{e}" for i, e in enumerate(["png", "jpg", "png", "jpg"])
    ]
    for name in rows:
        for data, label, path in rows[name]:
            assert data == (src / path).read_bytes()  # stored as is, never re-encoded
            assert label == manifest.classes.index(path.split("/")[1])

    folder = build_source(Config().update({"dataset": "folder", "data_dir": str(src), "val_split": "val"}))
    shards = parquet_source(dst)
    for ours, theirs in ((shards.train, folder.train), (shards.val, folder.val)):
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        assert all(np.array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0])) for i in range(len(theirs)))


def test_validation_labels_follow_the_class_map_not_a_sort_of_their_own(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"ant": 1, "cat": 1, "dog": 1}, "validation": {"dog": 2, "cat": 1}})
    class_map = tmp_path / "classes.txt"
    class_map.write_text("dog\ncat\nant\n")
    manifest = run_prepare(src, tmp_path / "out", class_map=str(class_map))
    assert manifest.classes == ["dog", "cat", "ant"]
    val = list(iter_rows(str(tmp_path / "out"), manifest.splits["validation"]))
    assert [(r[2], r[1]) for r in val] == [
        ("validation/dog/00.png", 0),
        ("validation/dog/01.jpg", 0),
        ("validation/cat/00.png", 1),
    ]
    assert manifest.splits["validation"].class_counts == [2, 1, 0]
    for split in manifest.splits.values():
        for data, label, path in iter_rows(str(tmp_path / "out"), split):
            assert data == (src / path).read_bytes()  # each row's bytes are the file its path names
            assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))[:3] == pytest.approx(
                COLORS[manifest.classes[label]], abs=8
            )  # JPEG is lossy; the colour still names the class


def test_differing_class_sets_are_an_error(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"ant": 1, "cat": 1}, "validation": {"cat": 1}})
    with pytest.raises(DataError, match="differ"):
        run_prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_empty_class_folder_is_named(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"ant": 1, "cat": 1}, "validation": {"ant": 1, "cat": 1}})
    for f in (src / "validation" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="class 'cat'"):
        run_prepare(src, tmp_path / "out")


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "pool"])
def test_bad_files_are_skipped_listed_and_reported(tmp_path, capsys, workers):
    src = make_tree(tmp_path / "src", {"train": {"cat": 3, "dog": 2}, "validation": {"cat": 1, "dog": 1}})
    expected = add_bad_files(src / "train")
    dst = tmp_path / "out"
    manifest = prepare(str(src), str(dst), workers=workers, progress_stream=io.StringIO())
    err = capsys.readouterr().err

    assert sorted(s["path"] for s in manifest.skipped) == sorted(expected)
    for entry in manifest.skipped:
        assert entry["split"] == "train" and entry["reason"]
        assert expected[entry["path"]] in entry["reason"] and "0x" not in entry["reason"]
        assert f"skipped {src / entry['path']}: {entry['reason']}" in err  # the full path, so it can be found
    assert read_manifest(str(dst)).skipped == manifest.skipped
    assert manifest.splits["train"].num_samples == 5 and manifest.splits["train"].class_counts == [3, 2]
    written = [r[2] for r in iter_rows(str(dst), manifest.splits["train"])]
    assert not set(written) & set(expected)
    assert "skipped             3 file(s)" in err  # the summary


def test_pool_and_in_process_write_identical_shards(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"cat": 5, "dog": 4}, "validation": {"cat": 2, "dog": 2}})
    add_bad_files(src / "train")
    run_prepare(src, tmp_path / "a", shard_size=4, workers=0)
    run_prepare(src, tmp_path / "b", shard_size=4, workers=2)
    a, b = folder_snapshot(tmp_path / "a"), folder_snapshot(tmp_path / "b")
    assert a == b and len(a) == 5  # 9 good train rows -> 3 shards of 4, 4 validation rows -> 1, the manifest


def test_images_over_the_pixel_limit_are_skipped(tmp_path):
    src = make_tree(tmp_path / "src", {"train": {"cat": 2}, "validation": {"cat": 1}})
    save_image(src / "train" / "cat" / "big.png", COLORS["cat"], "PNG")
    Image.new("RGB", (40, 40)).save(src / "train" / "cat" / "big.png")
    manifest = run_prepare(src, tmp_path / "out", max_image_pixels=35 * 35)
    assert [(s["path"], "pixels" in s["reason"]) for s in manifest.skipped] == [("train/cat/big.png", True)]
    assert manifest.splits["train"].num_samples == 2


def test_no_readable_training_image_is_an_error(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "validation"):
        (src / split / "cat").mkdir(parents=True)
        (src / split / "cat" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable training images"):
        run_prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


# ---- the destination -------------------------------------------------------------------------------------------
@pytest.fixture()
def two_trees(tmp_path):
    first = make_tree(tmp_path / "first", {"train": {"cat": 2, "dog": 1}, "validation": {"cat": 1, "dog": 1}})
    second = make_tree(tmp_path / "second", {"train": {"ant": 3}, "validation": {"ant": 1}})
    return first, second


def test_rerun_replaces_an_existing_data_set(tmp_path, two_trees):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst, shard_size=1)
    assert len(read_manifest(str(dst)).splits["train"].shards) == 3
    manifest = run_prepare(second, dst, shard_size=2)
    assert read_manifest(str(dst)).classes == ["ant"] == manifest.classes
    assert sorted(p.name for p in dst.iterdir()) == [
        MANIFEST,
        "train-00000.parquet",
        "train-00001.parquet",
        "validation-00000.parquet",
    ]  # no stale shards of the first
    verify_folder(str(dst))
    assert leftovers(dst) == []


def test_failure_midway_leaves_the_old_data_set_intact(tmp_path, two_trees, monkeypatch):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst)
    before = folder_snapshot(dst)

    def broken_manifest(folder, manifest):
        assert any(folder.glob("train-*.parquet"))  # failing after the shards were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "write_manifest", broken_manifest)
    with pytest.raises(OSError, match="No space"):
        run_prepare(second, dst)
    assert folder_snapshot(dst) == before
    assert leftovers(dst) == []


def test_failure_while_swapping_in_restores_the_old_data_set(tmp_path, two_trees, monkeypatch):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst)
    before = folder_snapshot(dst)
    real_rename = os.rename

    def rename(a, b):
        if ".partial-" in str(a):
            raise OSError("rename failed")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        run_prepare(second, dst)
    monkeypatch.undo()
    assert folder_snapshot(dst) == before and leftovers(dst) == []


def test_interrupt_in_the_pool_leaves_nothing_behind(tmp_path, two_trees, monkeypatch):
    first, _ = two_trees
    dst = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.ShardWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(first, dst, workers=2)
    assert not dst.exists() and leftovers(dst) == []


def test_a_stale_partial_folder_of_the_same_name_is_left_alone(tmp_path, two_trees):
    first, _ = two_trees
    dst = tmp_path / "out"
    stale = tmp_path / f"out.partial-{os.getpid()}"  # a killed run's, or a folder of the user's: not ours to delete
    stale.mkdir()
    (stale / "train-00099.parquet").write_bytes(b"junk")
    run_prepare(first, dst)
    assert folder_snapshot(stale) == {"train-00099.parquet": b"junk"}
    assert not (dst / "train-00099.parquet").exists() and leftovers(dst) == [stale.name]
    verify_folder(str(dst))


def test_a_user_file_beside_an_empty_manifest_survives(tmp_path, two_trees):
    first, _ = two_trees
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / MANIFEST).write_text("{}")
    (dst / "thesis.tex").write_text("mine")
    with pytest.raises(DataError, match=rf"(?s){MANIFEST} that .*did not write.*thesis\.tex.*empty or new folder"):
        run_prepare(first, dst)
    assert folder_snapshot(dst) == {MANIFEST: b"{}", "thesis.tex": b"mine"} and leftovers(dst) == []


@pytest.mark.parametrize("extra", ["file", "folder", "replaced-shard"])
def test_a_user_file_beside_an_earlier_data_set_survives(tmp_path, two_trees, extra):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst)
    if extra == "file":
        (dst / "notes.txt").write_text("mine")
    elif extra == "folder":
        (dst / "mine").mkdir()
        (dst / "mine" / "photo.jpg").write_bytes(b"precious")
    else:  # a listed shard name now holds other bytes: they may be the user's
        (dst / "train-00000.parquet").write_bytes(b"not the shard prepare wrote")
    before = {p.relative_to(dst): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()}
    with pytest.raises(DataError, match="did not write .*empty or new folder"):
        run_prepare(second, dst)
    assert {p.relative_to(dst): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()} == before
    assert leftovers(dst) == []


def test_an_earlier_data_set_missing_a_shard_is_still_replaced(tmp_path, two_trees):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst, shard_size=1)
    (dst / "train-00001.parquet").unlink()  # nothing of the user's is at stake
    run_prepare(second, dst)
    assert read_manifest(str(dst)).classes == ["ant"] and leftovers(dst) == []
    verify_folder(str(dst))


def test_a_file_written_into_dst_while_preparing_is_kept(tmp_path, two_trees, monkeypatch):
    first, second = two_trees
    dst = tmp_path / "out"
    run_prepare(first, dst)
    real_write_all = prepare_module.write_all

    def write_all_then_user_saves(*args, **kwargs):
        manifest = real_write_all(*args, **kwargs)
        (dst / "saved-meanwhile.txt").write_text("mine")
        return manifest

    monkeypatch.setattr(prepare_module, "write_all", write_all_then_user_saves)
    with pytest.raises(DataError, match="saved-meanwhile.txt"):
        run_prepare(second, dst)
    assert (dst / "saved-meanwhile.txt").read_text() == "mine" and read_manifest(str(dst)).classes == ["cat", "dog"]
    assert leftovers(dst) == []


def test_publish_hands_back_a_dst_that_changed_after_the_last_check(tmp_path, two_trees):
    first, second = two_trees
    dst, partial = tmp_path / "out", tmp_path / "new"
    run_prepare(first, dst)
    run_prepare(second, partial)
    replaceable = prepare_module.check_destination(str(first), "folder", str(dst))
    (dst / "late.txt").write_text("mine")  # between the check and the swap
    with pytest.raises(DataError, match="changed while prepare ran"):
        prepare_module.publish(partial, dst, replaceable, log=lambda message: None)
    assert (dst / "late.txt").read_text() == "mine" and read_manifest(str(dst)).classes == ["cat", "dog"]
    assert leftovers(dst) == [] and (partial / MANIFEST).is_file()


def test_an_unrelated_folder_is_never_replaced(tmp_path, two_trees):
    first, _ = two_trees
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DataError, match="not a prepared data set"):
        run_prepare(first, dst)
    assert folder_snapshot(dst) == {"holiday.jpg": b"precious"} and leftovers(dst) == []


def test_an_empty_folder_or_a_missing_parent_is_fine(tmp_path, two_trees):
    first, _ = two_trees
    (tmp_path / "empty").mkdir()
    run_prepare(first, tmp_path / "empty")
    run_prepare(first, tmp_path / "a" / "b" / "out")
    verify_folder(str(tmp_path / "empty"))
    verify_folder(str(tmp_path / "a" / "b" / "out"))
    assert leftovers(tmp_path / "empty") == [] and leftovers(tmp_path / "a" / "b" / "out") == []


@pytest.mark.parametrize("where", ["file", "inside-src", "is-src", "uri"])
def test_destinations_that_are_refused(tmp_path, two_trees, where):
    first, _ = two_trees
    dst = {"file": tmp_path / "file.txt", "inside-src": first / "shards", "is-src": first, "uri": "s3://bucket/shards"}[
        where
    ]
    if where == "file":
        dst.write_text("x")
    with pytest.raises(DataError):
        run_prepare(first, dst)
    assert not (first / "shards").exists()


def test_a_prepared_folder_is_not_a_source(tmp_path, two_trees):
    first, _ = two_trees
    run_prepare(first, tmp_path / "out")
    with pytest.raises(DataError, match="already is a prepared data set"):
        run_prepare(tmp_path / "out", tmp_path / "again")


# ---- Fashion-MNIST (a small fake IDX folder; the real 70k set is a command, not a test) -------------------------
def write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_an_idx_folder(tmp_path):
    rng = np.random.RandomState(1)
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx_gz(idx / "train-images-idx3-ubyte.gz", rng.randint(0, 256, (12, 6, 6)))
    write_idx_gz(idx / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx_gz(idx / "t10k-images-idx3-ubyte.gz", rng.randint(0, 256, (5, 6, 6)))
    write_idx_gz(idx / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3, 3, 1]))
    dst = tmp_path / "out"
    manifest = run_prepare(idx, dst, dataset="fashion_mnist", shard_size=5)
    verify_folder(str(dst))
    assert manifest.classes == FASHION_MNIST_CLASSES
    assert manifest.splits["train"].shard_sizes() == [5, 5, 2]
    assert manifest.source == f"fashion_mnist:{idx.resolve()}"
    original, shards = load_fashion_mnist_source(str(idx)), parquet_source(dst)
    for ours, theirs in ((shards.train, original.train), (shards.val, original.val)):
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        assert all(np.array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0])) for i in range(len(theirs)))
    assert [r[2] for r in iter_rows(str(dst), manifest.splits["validation"])][:2] == [
        "fashion_mnist/val[0]",
        "fashion_mnist/val[1]",
    ]


@pytest.mark.parametrize(
    "src, dataset, kind",
    [
        ("digits", None, "digits"),
        ("fashion_mnist", None, "fashion_mnist"),
        ("fashion-mnist", None, "fashion_mnist"),
        ("./digits", None, "folder"),
        ("/data/imagenet", None, "folder"),
        ("x", "imagefolder", "folder"),
        ("/idx", "fashion_mnist", "fashion_mnist"),
    ],
)
def test_what_src_is(src, dataset, kind):
    assert resolve_dataset(src, dataset) == kind


@pytest.mark.parametrize("dataset", ["parquet", "synthetic", "cifar"])
def test_unpreparable_datasets(dataset):
    with pytest.raises(DataError, match="prepare reads"):
        resolve_dataset("x", dataset)


def test_bad_arguments_are_data_errors(tmp_path):
    for kwargs in ({"shard_size": 0}, {"workers": -1}, {"max_image_pixels": 0}):
        with pytest.raises(DataError):
            run_prepare("digits", tmp_path / "out", **kwargs)
    with pytest.raises(DataError, match="SRC must be 'digits'"):
        run_prepare(tmp_path, tmp_path / "out", dataset="digits")
    with pytest.raises(DataError, match="not a folder"):
        run_prepare(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_prepare_succeeds(tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["prepare", "digits", str(dst), "--shard-size", "700", "-j", "0"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "prepare: 1,797/1,797 (100.0%)" in err and f"Prepared {dst}: 10 classes" in err
    manifest = json.loads((dst / MANIFEST).read_text())
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "validation")] == [3, 1]


def test_cli_prepare_folder_options(tmp_path, capsys):
    src = make_tree(tmp_path / "src", {"training": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    (tmp_path / "classes.json").write_text('["dog", "cat"]')
    argv = [
        "prepare",
        str(src),
        str(tmp_path / "out"),
        "--dataset",
        "imagefolder",
        "--class-map",
        str(tmp_path / "classes.json"),
        "--train-split",
        "training",
        "--val-split",
        "test",
        "-j",
        "1",
        "--max-image-pixels",
        "1000",
    ]
    assert main(argv) == EXIT_OK
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.classes == ["dog", "cat"] and manifest.splits["validation"].class_counts == [0, 1]


@pytest.mark.parametrize("case", ["missing-src", "unrelated-dst", "bad-class-map"])
def test_cli_prepare_usage_errors_exit_2_with_one_line(tmp_path, capsys, case):
    src = make_tree(tmp_path / "src", {"train": {"cat": 1}, "validation": {"cat": 1}})
    dst = tmp_path / "out"
    argv = ["prepare", str(src), str(dst), "-j", "0"]
    if case == "missing-src":
        argv[1] = str(tmp_path / "nowhere")
    elif case == "unrelated-dst":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    else:
        argv += ["--class-map", str(tmp_path / "nope.txt")]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytrain-cls: ")


def test_cli_prepare_keeps_a_user_file_beside_a_foreign_manifest(tmp_path, capsys):
    src = make_tree(tmp_path / "src", {"train": {"cat": 1}, "validation": {"cat": 1}})
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / MANIFEST).write_text("{}")
    (dst / "keep.txt").write_text("mine")
    assert main(["prepare", str(src), str(dst), "-j", "0"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(dst) in err[0] and "keep.txt" in err[0]
    assert folder_snapshot(dst) == {MANIFEST: b"{}", "keep.txt": b"mine"} and leftovers(dst) == []


@pytest.mark.parametrize("flags", [["--shard-size", "0"], ["--dataset", "parquet"], ["--max-image-pixels", "-5"]])
def test_cli_prepare_rejects_bad_flags(tmp_path, flags):
    with pytest.raises(SystemExit) as info:
        main(["prepare", "digits", str(tmp_path / "out"), *flags])
    assert info.value.code == EXIT_USAGE
