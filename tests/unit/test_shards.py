"""raytrain_cls.data.shards + the parquet source: manifest round trip, checksums that catch altered shards, the
same rows through a local path and an s3:// URI (a local moto S3 server), and the shard-window sample order."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_cls.core.config import Config
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.sampler import ResumableDistributedSampler, block_order
from raytrain_cls.data.shards import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardWriter,
    read_manifest,
    read_shard,
    verify_folder,
)
from raytrain_cls.data.sources import DataError

CLASSES = ["dark", "light"]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 10), value).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root, n_train=23, n_val=7, shard_size=5) -> Manifest:
    """Sample i of a split is a grey square of value i (so a decoded pixel says which row it came from)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        w = ShardWriter(str(root), split, shard_size, num_classes=2)
        for i in range(n):
            w.add(png(i), i % 2, f"{split}/{i}.png")
        splits[split] = w.close()
    manifest = Manifest(CLASSES, splits, source="test")
    (root / MANIFEST).write_text(manifest.to_json())
    return manifest


def parquet_cfg(uri: str, **flat) -> Config:
    return (
        Config()
        .update({"dataset": "parquet", "data_dir": uri, "model": "test_resnet", "batch_size": 4, "workers": 0, **flat})
        .validate()
    )


def test_manifest_round_trip_and_shard_layout(tmp_path):
    written = write_shards(tmp_path / "s")
    read = read_manifest(str(tmp_path / "s"))
    assert read == written
    train = read.splits["train"]
    assert train.shard_sizes() == [5, 5, 5, 5, 3] and train.num_samples == 23 and train.class_counts == [12, 11]
    assert [s.file for s in train.shards][:2] == ["train-00000.parquet", "train-00001.parquet"]
    verify_folder(str(tmp_path / "s"))


def test_rows_keep_order_labels_and_bytes(tmp_path):
    write_shards(tmp_path / "s")
    src = build_source(parquet_cfg(str(tmp_path / "s")))
    assert src.classes == CLASSES and (len(src.train), len(src.val)) == (23, 7)
    for i in (0, 4, 5, 22):
        img, label = src.train[i]
        assert label == i % 2 and np.asarray(img)[0, 0].tolist() == [i, i, i]
        assert src.train.encoded(i) == (png(i), i % 2)
    assert src.train.targets.tolist() == [i % 2 for i in range(23)]


def test_an_altered_shard_is_refused_by_checksum(tmp_path):
    manifest = write_shards(tmp_path / "s")
    path = tmp_path / "s" / manifest.splits["train"].shards[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="does not match its sha256"):
        read_shard(str(tmp_path / "s"), manifest.splits["train"].shards[1])
    src = build_source(parquet_cfg(str(tmp_path / "s")))
    src.train[0]  # other shards still read
    with pytest.raises(ShardError, match="train-00001.parquet"):
        src.train[6]


def test_a_truncated_shard_is_refused_by_size(tmp_path):
    manifest = write_shards(tmp_path / "s")
    path = tmp_path / "s" / manifest.splits["validation"].shards[0].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="bytes, the manifest says"):
        verify_folder(str(tmp_path / "s"))


def test_missing_or_foreign_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no manifest.json"):
        build_source(parquet_cfg(str(tmp_path / "empty")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a raytrain-cls shard manifest"):
        build_source(parquet_cfg(str(tmp_path / "other")))


def test_split_synonyms_apply_to_shards(tmp_path):
    write_shards(tmp_path / "s")
    assert len(build_source(parquet_cfg(str(tmp_path / "s"), val_split="val")).val) == 7
    with pytest.raises(DataError, match="has no 'holdout' split"):
        build_source(parquet_cfg(str(tmp_path / "s"), val_split="holdout"))


def test_s3_uri_reads_the_same_rows(tmp_path, s3_upload):
    write_shards(tmp_path / "s")
    uri = s3_upload(tmp_path / "s", "unit/s")
    local = build_source(parquet_cfg(str(tmp_path / "s")))
    remote = build_source(parquet_cfg(uri))
    assert remote.classes == local.classes and len(remote.train) == len(local.train)
    for i in range(len(local.train)):
        assert remote.train.encoded(i) == local.train.encoded(i)
    assert remote.val.targets.tolist() == local.val.targets.tolist()


def test_s3_uri_that_does_not_exist_is_a_clear_error(s3_endpoint):
    uri = f"s3://data/nowhere?endpoint_override={s3_endpoint}&scheme=http"
    with pytest.raises(DataError, match="holds no manifest.json"):
        build_source(parquet_cfg(uri))


# ---- the shard-window order ----------------------------------------------------------------------------------
def test_block_order_is_a_permutation_that_stays_inside_windows():
    sizes = [5] * 6
    order = block_order(sizes, seed=1, epoch=0, window=2).tolist()
    assert sorted(order) == list(range(30))
    windows = [{i // 5 for i in order[lo : lo + 10]} for lo in (0, 10, 20)]
    assert all(len(w) == 2 for w in windows)  # each run of 10 samples = exactly two whole shards
    assert set().union(*windows) == set(range(6))
    assert order[:10] != sorted(order[:10])  # shuffled inside the window


def test_block_order_depends_only_on_seed_and_epoch():
    sizes = [4] * 6
    a = block_order(sizes, 3, 1, 2)
    assert torch.equal(a, block_order(sizes, 3, 1, 2))
    assert not torch.equal(a, block_order(sizes, 3, 2, 2))
    assert not torch.equal(a, block_order(sizes, 4, 1, 2))
    assert not torch.equal(block_order(sizes, 3, 1, 0), torch.arange(24))  # window 0: a full shuffle


def test_sharded_sampler_resumes_exactly_with_another_worker_count():
    """Stop 2 ranks after 3 steps of 2, resume on 3 ranks: every remaining sample exactly once."""
    sizes = [5, 5, 5, 5, 3]
    kw = dict(seed=7, blocks=sizes, window=2)
    first = []
    for rank in range(2):
        s = ResumableDistributedSampler(23, rank, 2, **kw)
        s.set_epoch(4)
        first += list(s)[:6]
    rest = []
    for rank in range(3):
        s = ResumableDistributedSampler(23, rank, 3, **kw)
        s.set_epoch(4, consumed=12)
        rest += list(s)
    counts = Counter(first + rest)
    assert set(counts) == set(range(23))
    assert len(first) == len(set(first)) == 12 and len(rest) == 12
    # the 11 samples not yet seen, each once, plus one pad slot (repeating the epoch's first sample)
    assert sorted(set(rest) - set(first)) == sorted(set(range(23)) - set(first))
    assert sum(1 for i in rest if i in first) == 1


def test_loader_uses_the_shard_window_and_reads_few_shards(tmp_path, monkeypatch):
    import raytrain_cls.data.shards as shards

    write_shards(tmp_path / "s", n_train=40, shard_size=5)  # 8 shards
    reads = []
    real = shards.read_shard
    monkeypatch.setattr(
        shards, "read_shard", lambda root, shard, verify=True: reads.append(shard.file) or real(root, shard, verify)
    )
    cfg = parquet_cfg(str(tmp_path / "s"), shuffle_window=2)
    src = build_source(cfg)
    dc = {
        "input_size": [3, 8, 8],
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    loaders = build_loaders(cfg, src, dc, rank=0, world_size=1)
    loaders.set_epoch(0)
    assert loaders.train_sampler.blocks == [5] * 8 and loaders.train_sampler.window == 2
    batches = sum(1 for _ in loaders.train)
    assert batches == 10
    train_reads = [r for r in reads if r.startswith("train")]
    assert sorted(train_reads) == sorted(f"train-{i:05d}.parquet" for i in range(8))  # each shard read once


# ---- synthetic (throughput only) ------------------------------------------------------------------------------
def test_synthetic_source_sizes_labels_and_encoded_jpegs():
    cfg = Config().update({"dataset": "synthetic", "synthetic_samples": 50, "num_classes": 7, "img_size": 16})
    src = build_source(cfg.validate())
    assert (len(src.train), len(src.val)) == (50, 5) and src.num_classes == 7
    img, label = src.train[9]
    assert img.size == (16, 16) and label == 9 % 7
    data, label = src.train.encoded(9)
    assert data[:2] == b"\xff\xd8" and label == 2  # a JPEG, for the --gpu-decode path
    assert Image.open(io.BytesIO(data)).size == (16, 16)
