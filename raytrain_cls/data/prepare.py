"""`raytrain-cls prepare SRC DST`: convert a data set into Parquet shards (the format of shards.py).

SRC is an ImageFolder tree (train/ and validation/ or one of timm's synonyms, one sub-folder per class), the name
``digits`` (sklearn's, bundled) or ``fashion_mnist`` (the IDX files of Debian's dataset-fashion-mnist, or a folder
holding them with ``dataset="fashion_mnist"``). Image files are checked by decoding them once and stored as their
original bytes (never re-encoded); images held as arrays are stored as lossless PNG. Files that cannot be decoded
are left out, reported on stderr and listed in the manifest.

DST is a local folder: a new one, an empty one, or the output of an earlier prepare (its manifest and shards and
nothing else), which is replaced; any other folder is refused untouched, and prepare never deletes a file it did not
write. DST is written beside itself as ``DST.partial-<pid>`` and renamed into place only once it is complete, so an
interrupted run never leaves a half data set under DST and never destroys the previous one. The
finished folder can be copied to object storage (e.g. ``aws s3 sync DST s3://bucket/prefix``) and trained from with
``--dataset parquet --data-dir s3://bucket/prefix``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from raytrain_cls.core.config import DEFAULT_MAX_IMAGE_PIXELS
from raytrain_cls.core.datasets import PREPARABLE, canonical_dataset
from raytrain_cls.core.progress import Progress
from raytrain_cls.data.shards import MANIFEST, Manifest, ShardError, ShardWriter, SplitInfo
from raytrain_cls.data.sources import (
    FASHION_MNIST_DIR,
    ArrayImages,
    BadImageError,
    DataError,
    FileImages,
    Source,
    decode_image,
    load_digits_source,
    load_fashion_mnist_source,
    load_folder_source,
)

SPLIT_NAMES = ("train", "validation")  # the manifest's split names, whatever the source calls them
BLOCK_PER_WORKER = 64  # samples in flight per worker process: bounds memory on large data sets


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the work done per sample (in worker processes: module-level, so it pickles) ------------------------------
def read_verified(path: str, max_pixels: int) -> tuple[Optional[bytes], str]:
    """(the file's bytes, "") when it decodes as an image; (None, reason) when it does not."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    try:
        decode_image(data, path, max_pixels)
    except BadImageError as e:
        return None, e.reason
    return data, ""


def encode_png(pixels: np.ndarray) -> tuple[Optional[bytes], str]:
    """A grey uint8 (H, W) array as PNG bytes (lossless: the shards decode to the very same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue(), ""


# ---- what to write ------------------------------------------------------------------------------------------
@dataclass
class SplitPlan:
    """One split to write: ``convert(items[i])`` gives sample i's stored bytes (or None and why not)."""

    name: str
    items: Sequence
    labels: np.ndarray
    paths: list[str]
    convert: Callable[..., tuple[Optional[bytes], str]]
    shown_as: Callable[[str], str] = str  # how a skipped sample is named on stderr

    def __len__(self) -> int:
        return len(self.labels)


def plan_folder_split(name: str, ds: FileImages, root: Path, max_pixels: int) -> SplitPlan:
    # Rows carry the path relative to SRC (portable; the manifest records SRC), so the same tree gives the same
    # shards wherever it lives.
    paths = [f.relative_to(root).as_posix() for f in ds.files]
    # Skipped files are reported by their full path, so the user can find them.
    return SplitPlan(
        name,
        [str(f) for f in ds.files],
        ds.targets,
        paths,
        functools.partial(read_verified, max_pixels=max_pixels),
        shown_as=lambda p: str(root / p),
    )


def plan_array_split(name: str, ds: ArrayImages) -> SplitPlan:
    return SplitPlan(name, ds.images, ds.targets, [ds.describe(i) for i in range(len(ds))], encode_png)


def resolve_dataset(src: str, dataset: Optional[str]) -> str:
    """The kind of SRC: the given dataset, else a bare built-in name (``digits``, ``fashion_mnist``; write
    ``./digits`` for a folder of that name), else an ImageFolder tree."""
    if dataset is None:
        kind = canonical_dataset(src)
        return kind if kind in ("digits", "fashion_mnist") else "folder"
    kind = canonical_dataset(dataset)
    if kind not in PREPARABLE:
        raise DataError(
            f"prepare reads {', '.join(PREPARABLE)}, not {dataset!r}"
            + (" (it already is a prepared data set)" if kind == "parquet" else "")
        )
    return kind


def load_plans(
    src: str, kind: str, class_map: Optional[str], train_split: str, val_split: str, max_pixels: int
) -> tuple[Source, list[SplitPlan], str]:
    """(the source, one plan per output split, a description of SRC for the manifest)."""
    if class_map and kind in ("digits", "fashion_mnist"):  # ignoring it would look as if it had been applied
        raise DataError(f"--class-map names the classes of an ImageFolder SRC; {kind} brings its own: drop it")
    if kind == "digits":
        if canonical_dataset(src) != "digits":
            raise DataError(f"the digits data set is bundled with scikit-learn: SRC must be 'digits', not {src!r}")
        source = load_digits_source()
        return source, [plan_array_split(n, ds) for n, ds in zip(SPLIT_NAMES, (source.train, source.val))], "digits"
    if kind == "fashion_mnist":
        idx_dir = None if canonical_dataset(src) == "fashion_mnist" else src
        source = load_fashion_mnist_source(idx_dir)
        described = f"fashion_mnist:{Path(idx_dir or FASHION_MNIST_DIR).resolve()}"
        return source, [plan_array_split(n, ds) for n, ds in zip(SPLIT_NAMES, (source.train, source.val))], described
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"SRC {src} is not a folder (an ImageFolder tree), nor 'digits' or 'fashion_mnist'")
    if class_map and not Path(class_map).is_file():
        raise DataError(f"class map {class_map}: no such file")
    if (root / MANIFEST).is_file():
        raise DataError(f"{src} already is a prepared data set ({MANIFEST}); train from it with --data-dir {src}")
    source = load_folder_source(src, train_split, val_split, class_map)
    plans = [plan_folder_split(n, ds, root, max_pixels) for n, ds in zip(SPLIT_NAMES, (source.train, source.val))]
    return source, plans, str(root.resolve())


# ---- converting, in order, on a pool of processes -------------------------------------------------------------
def _pool_context():
    # fork: the workers start at once with everything already imported (spawn would re-import torch in each,
    # seconds apiece); they only decode and encode images.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def convert_in_order(plan: SplitPlan, pool, workers: int) -> Iterator[tuple[Optional[bytes], str]]:
    """convert() of each item, in the plan's order, on the pool (or here when there is none). Items go out in
    blocks so that at most a block of results waits in memory, however large the split."""
    if pool is None:
        for item in plan.items:
            yield plan.convert(item)
        return
    block = BLOCK_PER_WORKER * workers
    for start in range(0, len(plan), block):
        chunk = [plan.items[i] for i in range(start, min(start + block, len(plan)))]
        yield from pool.imap(plan.convert, chunk, chunksize=max(1, len(chunk) // (4 * workers)))


def write_split(
    plan: SplitPlan,
    folder: Path,
    shard_size: int,
    num_classes: int,
    pool,
    workers: int,
    progress: Progress,
    log: Callable[[str], None],
) -> tuple[SplitInfo, list[dict]]:
    writer = ShardWriter(str(folder), plan.name, shard_size, num_classes)
    skipped = []
    for (data, reason), label, path in zip(convert_in_order(plan, pool, workers), plan.labels, plan.paths):
        if data is None:
            skipped.append({"split": plan.name, "path": path, "reason": reason})
            log(f"skipped {plan.shown_as(path)}: {reason}")
        else:
            writer.add(data, int(label), path)
        progress.update()
    return writer.close(), skipped


def write_manifest(folder: Path, manifest: Manifest) -> None:
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the destination: written aside, swapped in whole ---------------------------------------------------------
UNEXPECTED_SHOWN = 5  # how many of the files that block a DST the error names


def check_destination(src: str, kind: str, dst: str) -> list[str]:
    """Refuse a DST that is not ours to replace: a URI, a file, a folder that holds (or lies inside) SRC, or a
    non-empty folder that is not a complete earlier output of prepare. Returns the names replacing DST may delete
    (see replaceable_files); touches nothing."""
    if "://" in dst:
        raise DataError(f"DST {dst} must be a local folder: prepare there, then copy it (e.g. `aws s3 sync`)")
    dst = Path(dst)
    if kind != "digits" and canonical_dataset(src) != kind:
        a, b = Path(src).resolve(), dst.resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise DataError(f"DST {dst} and SRC {src} overlap: write the shards outside the source folder")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise DataError(f"DST {dst} exists and is not a folder")
    return replaceable_files(dst) if dst.is_dir() else []


def earlier_manifest(folder: Path) -> tuple[Optional[Manifest], str]:
    """(the manifest, "") when ``folder/manifest.json`` is one prepare wrote, else (None, why it is not)."""
    try:
        text = (folder / MANIFEST).read_bytes().decode("utf-8")
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    try:
        return Manifest.from_json(text, str(folder / MANIFEST)), ""
    except ShardError as e:
        return None, str(e)


def replaceable_files(folder: Path) -> list[str]:
    """The names in ``folder`` that prepare wrote and may delete to replace it: none for an empty folder; the
    manifest and the shards it lists, for an earlier output of prepare that holds nothing else (each listed shard a
    plain file of the recorded size; a missing one costs nobody anything). Anything else (a user's file beside a
    manifest, a manifest that is not ours, a sub-folder, a shard replaced by another file) raises DataError naming
    the folder and what is in the way, so that a mistyped DST can never cost the user their files."""
    present = {entry.name: entry for entry in folder.iterdir()}
    if not present:
        return []
    if MANIFEST not in present:
        raise DataError(
            f"DST {folder} is a non-empty folder that is not a prepared data set (no {MANIFEST}; it holds "
            f"{_some(present)}): refusing to replace it; choose an empty or new folder for DST"
        )
    manifest, why = earlier_manifest(folder)
    if manifest is None:
        raise DataError(
            f"DST {folder} holds a {MANIFEST} that `raytrain-cls prepare` did not write ({why}) beside "
            f"{_some(present)}: refusing to replace it; choose an empty or new folder for DST"
        )
    ours = {MANIFEST: None} | {shard.file: shard.bytes for split in manifest.splits.values() for shard in split.shards}
    unexpected = [name for name in present if name not in ours]
    for name, size in ours.items():
        if name in present and not (present[name].is_file() and not present[name].is_symlink()):
            unexpected.append(name)  # a listed name that is now a folder or a link is not a shard we wrote
        elif name in present and size is not None and present[name].stat().st_size != size:
            unexpected.append(name)  # replaced since: its bytes may be the user's
    if unexpected:
        raise DataError(
            f"DST {folder} holds files that `raytrain-cls prepare` did not write ({_some(unexpected)}) beside an "
            "earlier prepared data set: refusing to replace it; choose an empty or new folder for DST "
            "(or move those files out yourself)"
        )
    return [name for name in ours if name in present]


def _some(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:UNEXPECTED_SHOWN])
    return shown + (f" and {len(names) - UNEXPECTED_SHOWN} more" if len(names) > UNEXPECTED_SHOWN else "")


def new_sibling(dst: Path, tag: str) -> Path:
    """A folder name beside DST that nothing uses yet (``DST.<tag>-<pid>``, then ``-1``, ``-2``, ...): prepare only
    ever writes to, and later removes, a folder it made itself, never one that merely has the expected name."""
    for attempt in range(1000):
        candidate = dst.with_name(f"{dst.name}.{tag}-{os.getpid()}" + (f"-{attempt}" if attempt else ""))
        if not os.path.lexists(candidate):
            return candidate
    raise DataError(f"no free name for a {tag} folder beside {dst}: remove the {dst.name}.{tag}-* folders there")


def make_partial(dst: Path) -> Path:
    for _ in range(10):
        partial = new_sibling(dst, "partial")
        try:
            partial.mkdir()  # atomic: fails rather than adopting a folder that appeared since the check
            return partial
        except FileExistsError:
            continue
    raise DataError(f"cannot create a new folder beside {dst} to write into")


def publish(partial: Path, dst: Path, replaceable: list[str], log: Callable[[str], None]) -> None:
    """Move the complete ``partial`` folder to ``dst``. A missing or empty DST is replaced by the rename itself
    (which fails, rather than deleting anything, if a file appeared there meanwhile). An earlier prepared data set
    is set aside first (restored if the swap fails), and afterwards only the files of it that passed
    replaceable_files are deleted, by name: anything that appeared there since is kept and reported."""
    if not replaceable:
        os.rename(partial, dst)
        fsync_dir(dst.parent)
        return
    old = new_sibling(dst, "old")
    os.rename(dst, old)
    try:
        unexpected = sorted({entry.name for entry in old.iterdir()} - set(replaceable))
        if unexpected:  # written into DST after the check: hand it back untouched
            raise DataError(
                f"DST {dst} changed while prepare ran (new: {_some(unexpected)}): refusing to replace it; "
                "choose an empty or new folder for DST"
            )
        os.rename(partial, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    for name in replaceable:
        # gone, or no longer a file: the rmdir below then keeps the folder and says so
        with contextlib.suppress(OSError):
            os.unlink(old / name)
    try:
        os.rmdir(old)
    except OSError:
        log(f"warning: kept {old}: it holds files prepare did not write (the new data set is in {dst})")


# ---- the command ----------------------------------------------------------------------------------------------
def prepare(
    src: str,
    dst: str,
    *,
    dataset: Optional[str] = None,
    shard_size: int = 1024,
    class_map: Optional[str] = None,
    train_split: str = "train",
    val_split: str = "validation",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: Optional[int] = None,
    log: Callable[[str], None] = _log_stderr,
    progress_stream=None,
) -> Manifest:
    """Convert SRC into Parquet shards in the local folder DST and return the manifest written there.

    ``workers`` processes check/encode the images (default: one per CPU; 0 or 1: in this process). The order of
    the samples is the source's (per class, files sorted), and validation labels come from the training class list
    (or the class map), as when training from SRC directly. Raises DataError for a source or destination that
    cannot be used; on any failure DST is left as it was and the partial folder is removed. The result can be
    copied to object storage (``aws s3 sync DST s3://bucket/prefix``) and read with ``--data-dir s3://...``.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1 (got {shard_size})")
    if max_image_pixels < 1:
        raise DataError(f"--max-image-pixels must be at least 1 (got {max_image_pixels})")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise DataError(f"--workers must be 0 or more (got {workers})")
    kind = resolve_dataset(str(src), dataset)
    check_destination(str(src), kind, str(dst))
    source, plans, described = load_plans(str(src), kind, class_map, train_split, val_split, max_image_pixels)
    dst_path = Path(os.path.abspath(dst))  # "." or "x/.." have no name to put a sibling folder beside

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    # A new folder of our own, never an existing one: a DST.partial-* left by a killed run is not reused or
    # removed, as a folder of that name may as well be the user's.
    partial = make_partial(dst_path)
    try:
        manifest = write_all(plans, source.classes, described, partial, shard_size, workers, log, progress_stream)
        replaceable = check_destination(str(src), kind, str(dst))  # it may have changed while we worked
        publish(partial, dst_path, replaceable, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours alone: made by make_partial, filled by write_all
        raise
    log(summary(manifest, dst_path))
    return manifest


def write_all(
    plans: list[SplitPlan],
    classes: list[str],
    described: str,
    folder: Path,
    shard_size: int,
    workers: int,
    log: Callable[[str], None],
    progress_stream,
) -> Manifest:
    splits, skipped = {}, []
    pool = _pool_context().Pool(workers) if workers > 1 else None
    try:
        with Progress(sum(len(p) for p in plans), "prepare", stream=progress_stream) as progress:
            for plan in plans:
                splits[plan.name], split_skipped = write_split(
                    plan, folder, shard_size, len(classes), pool, workers, progress, log
                )
                skipped += split_skipped
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if splits["train"].num_samples == 0:
        raise DataError(f"no readable training images in {described} ({len(skipped)} skipped)")
    for name, count in zip(classes, splits["train"].class_counts):
        if count == 0:
            log(f"warning: class '{name}' has no readable training images")
    manifest = Manifest(classes, splits, skipped, source=described)
    write_manifest(folder, manifest)
    return manifest


def format_bytes(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:,.1f} {unit}"


def summary(manifest: Manifest, dst: Path) -> str:
    shards = [s for split in manifest.splits.values() for s in split.shards]
    lines = [f"Prepared {dst}: {len(manifest.classes)} classes from {manifest.source}"]
    for name, split in manifest.splits.items():
        lines.append(f"  {name:<11} {split.num_samples:>9,} samples in {len(split.shards):,} shard(s)")
    lines.append(f"  skipped     {len(manifest.skipped):>9,} file(s)")
    lines.append(
        f"  size        {format_bytes(sum(s.bytes for s in shards)):>9} in {len(shards):,} shard(s) + {MANIFEST}"
    )
    lines.append(
        f"Train from it with --dataset parquet --data-dir {dst} (or copy it to object storage, e.g. "
        f"`aws s3 sync {dst} s3://BUCKET/PREFIX`, and use --data-dir s3://BUCKET/PREFIX)"
    )
    return "\n".join(lines)
