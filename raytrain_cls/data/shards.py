"""The Parquet shard format: encoded images + labels in shards, described by one manifest.

A prepared data set is a folder (local, NFS, or any pyarrow filesystem URI such as ``s3://bucket/prefix``)::

    manifest.json              classes, per split: sample and class counts, and per shard: rows, bytes, sha256
    train-00000.parquet        columns: image (binary: the encoded file), label (int64), path (string: origin)
    validation-00000.parquet

The manifest is written last, so a folder without one is an unfinished write, never a short data set. Every
shard is checked against the manifest's size and sha256 when it is read; a mismatch is an error, not a silent
retrain on different data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from raytrain_cls.core.errors import UserError

FORMAT = "raytrain-cls-shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(UserError, RuntimeError):
    """A shard folder that is incomplete, altered or unreadable; the message names the file."""


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.abspath(uri)
    return fs.FileSystem.from_uri(uri)


def _schema():
    import pyarrow as pa

    return pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])


@dataclass
class ShardInfo:
    file: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    class_counts: list[int]
    shards: list[ShardInfo]

    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.shards]


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    skipped: list[dict] = field(default_factory=list)  # {"split", "path", "reason"} for every file left out
    source: str = ""

    def to_json(self) -> str:
        splits = {
            name: dict(num_samples=s.num_samples, class_counts=s.class_counts, shards=[vars(x) for x in s.shards])
            for name, s in self.splits.items()
        }
        return json.dumps(
            dict(
                format=FORMAT,
                version=VERSION,
                classes=self.classes,
                splits=splits,
                skipped=self.skipped,
                source=self.source,
            ),
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ShardError(f"{where}: not a raytrain-cls shard manifest (format {raw.get('format')!r})")
            if raw.get("version") != VERSION:
                raise ShardError(
                    f"{where}: manifest version {raw.get('version')} is not supported (this is version {VERSION})"
                )
            splits = {
                name: SplitInfo(
                    int(s["num_samples"]),
                    [int(c) for c in s["class_counts"]],
                    [
                        ShardInfo(str(x["file"]), int(x["num_samples"]), int(x["bytes"]), str(x["sha256"]))
                        for x in s["shards"]
                    ],
                )
                for name, s in raw["splits"].items()
            }
            return cls(
                [str(c) for c in raw["classes"]], splits, list(raw.get("skipped", [])), str(raw.get("source", ""))
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def read_manifest(root: str) -> Manifest:
    fs, base = filesystem(root)
    path = posixpath.join(base, MANIFEST)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ShardError(
            f"{root} holds no {MANIFEST}: not a prepared data set, or its `raytrain-cls prepare` did not finish"
        ) from None
    except OSError as e:
        raise ShardError(f"cannot read {root}/{MANIFEST}: {e}") from None
    return Manifest.from_json(text, f"{root}/{MANIFEST}")


class ShardWriter:
    """Appends (encoded image, label, path) rows to ``{split}-NNNNN.parquet`` files of ``shard_size`` rows."""

    def __init__(self, folder: str, split: str, shard_size: int, num_classes: int, row_group_size: int = 256):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.row_group_size = max(1, min(row_group_size, shard_size))
        self.rows: list[tuple[bytes, int, str]] = []
        self.shards: list[ShardInfo] = []
        self.class_counts = [0] * num_classes

    def add(self, image: bytes, label: int, path: str) -> None:
        self.rows.append((image, label, path))
        self.class_counts[label] += 1
        if len(self.rows) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        images, labels, paths = zip(*self.rows)
        table = pa.table(
            [pa.array(images, pa.binary()), pa.array(labels, pa.int64()), pa.array(paths, pa.string())],
            schema=_schema(),
        )
        sink = io.BytesIO()
        # Encoded images do not compress further; no dictionary pages for unique blobs.
        pq.write_table(table, sink, row_group_size=self.row_group_size, compression="none", use_dictionary=["label"])
        data = sink.getvalue()
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        with open(os.path.join(self.folder, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(ShardInfo(name, len(self.rows), len(data), hashlib.sha256(data).hexdigest()))
        self.rows = []

    def close(self) -> SplitInfo:
        self._flush()
        return SplitInfo(sum(s.num_samples for s in self.shards), self.class_counts, self.shards)


def read_shard(root: str, shard: ShardInfo, verify: bool = True):
    """One shard as a pyarrow Table, after checking its size and sha256 against the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = filesystem(root)
    path = posixpath.join(base, shard.file)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise ShardError(f"cannot read shard {root}/{shard.file}: {e}") from None
    if len(data) != shard.bytes:
        raise ShardError(
            f"shard {root}/{shard.file} holds {len(data)} bytes, the manifest says {shard.bytes} "
            "(truncated or replaced): re-run `raytrain-cls prepare`"
        )
    if verify and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(
            f"shard {root}/{shard.file} does not match its sha256 in the manifest (altered or "
            "corrupt): re-run `raytrain-cls prepare`"
        )
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != shard.num_samples:
        raise ShardError(
            f"shard {root}/{shard.file} holds {table.num_rows} rows, the manifest says {shard.num_samples}"
        )
    return table


class ShardReader:
    """Random access to a split's rows (index -> (encoded bytes, label, path)) with a small LRU of whole shards.

    Each shard is read once into memory (one request, which suits object stores), verified, and kept while the
    sampler's shuffle window still needs it. Picklable before first use, so DataLoader processes each open
    their own.
    """

    def __init__(self, root: str, split: SplitInfo, cache_shards: int = 8):
        self.root, self.split, self.cache_shards = root, split, max(1, cache_shards)
        self.offsets = np.cumsum([0] + split.shard_sizes())
        self._cache: OrderedDict[int, tuple] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # never ship loaded shards to another process
        return state

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    def _columns(self, shard: int) -> tuple:
        cols = self._cache.get(shard)
        if cols is None:
            table = read_shard(self.root, self.split.shards[shard])
            cols = (table.column("image"), table.column("label").to_numpy(), table.column("path"))
            self._cache[shard] = cols
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shard)
        return cols

    def row(self, index: int) -> tuple[bytes, int, str]:
        shard, offset = self.locate(index)
        images, labels, paths = self._columns(shard)
        return images[offset].as_py(), int(labels[offset]), paths[offset].as_py()

    def labels(self) -> np.ndarray:
        """Every label of the split (reads each shard's label column only)."""
        import pyarrow.parquet as pq

        fs, base = filesystem(self.root)
        out = []
        for info in self.split.shards:
            with fs.open_input_file(posixpath.join(base, info.file)) as f:
                out.append(pq.read_table(f, columns=["label"]).column("label").to_numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def shard_files(root: str, split: SplitInfo) -> tuple:
    """(pyarrow filesystem, each shard's path inside it), e.g. for ray.data.read_parquet(paths, filesystem=fs).
    Paths are joined inside the filesystem, so a URI's query (?endpoint_override=...) is kept where it belongs."""
    fs, base = filesystem(root)
    return fs, [posixpath.join(base, s.file) for s in split.shards]


def iter_rows(root: str, split: SplitInfo) -> Iterable[tuple[bytes, int, str]]:
    reader = ShardReader(root, split, cache_shards=1)
    for i in range(len(reader)):
        yield reader.row(i)


def verify_folder(root: str, manifest: Optional[Manifest] = None) -> Manifest:
    """Read every shard and check it against the manifest; raises ShardError on the first mismatch."""
    manifest = manifest or read_manifest(root)
    for split in manifest.splits.values():
        for shard in split.shards:
            read_shard(root, shard)
    return manifest
