"""A checkpoint write that fails, weights that went non-finite, a damaged file, per-rank RNG: nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from records import resolved_record
from safetensors.torch import load_file

from raytrain_cls.commands.export import CONFIG_JSON, export_checkpoint
from raytrain_cls.core.config import Config
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.core.state import (
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    TrainState,
    file_digest,
    non_finite_tensors,
    rng_state,
)
from raytrain_cls.run.checkpointer import STAGING_PREFIX, remove_orphaned_staging, staging_dir

DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3)
CFG = Config().update({"dataset": "digits", "model": "test_resnet", "lr": 0.1, "img_size": 16}).validate()
CFG.resolved = resolved_record(
    num_classes=4, classes=["a", "b", "c", "d"], train_samples=16, val_samples=8, data_config=DATA_CONFIG
)


def new_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=4)
    return TrainState(CFG.to_dict(), model, build_optimizer(CFG, model))


def test_a_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    state = new_state()
    state.epoch = 3
    good = state.save(tmp_path / "epoch-0003")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    state.epoch = 4
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are untouched"):
        state.save(tmp_path / "epoch-0004")
    assert not (tmp_path / "epoch-0004" / META_FILE).exists()  # never mistaken for a complete checkpoint
    monkeypatch.undo()
    restored = new_state(seed=1)
    restored.load(good)
    assert restored.epoch == 3
    for a, b in zip(state.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    state = new_state()
    assert non_finite_tensors(state.model) == []
    with torch.no_grad():
        next(state.model.parameters())[0].fill_(float("nan"))
    assert len(non_finite_tensors(state.model)) == 1
    with pytest.raises(CheckpointError, match="non-finite weights"):
        state.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_truncated_weights_file_is_refused_by_name(tmp_path):
    ckpt = new_state().save(tmp_path / "ckpt")
    data = (ckpt / MODEL_FILE).read_bytes()
    (ckpt / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        new_state().load(ckpt)


def test_each_rank_gets_its_own_rng_stream_back(tmp_path):
    state = new_state()
    torch.manual_seed(11)
    rank0 = rng_state()
    torch.manual_seed(22)
    rank1 = rng_state()
    state.rank_states = [dict(rng=rank0, loss_sum=1.0, seen=2.0), dict(rng=rank1, loss_sum=3.0, seen=4.0)]
    ckpt = state.save(tmp_path / "ckpt")
    torch.manual_seed(22)
    expected = torch.rand(3)
    torch.manual_seed(0)
    new_state().load(ckpt, rank=1, world_size=2)
    assert torch.equal(torch.rand(3), expected)
    # Another world size: the streams do not map onto ranks; the RNG is left for the caller to seed.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded = new_state()
    torch.manual_seed(5)
    loaded.load(ckpt, rank=0, world_size=3)
    assert torch.equal(torch.rand(3), expected)
    assert [r["seen"] for r in loaded.rank_states] == [2.0, 4.0]


def test_export_rebuilds_with_timm_alone(tmp_path):
    state = new_state()
    state.epoch = 7
    ckpt = state.save(tmp_path / "epoch-0007", metrics={"eval_top1": 50.0})
    info = export_checkpoint(ckpt, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / CONFIG_JSON).read_text())
    assert cfg == json.loads(json.dumps(info))
    assert cfg["architecture"] == "test_resnet" and cfg["label_names"] == ["a", "b", "c", "d"]
    assert cfg["epoch"] == 7 and cfg["metrics"]["eval_top1"] == 50.0 and cfg["weights"] == [MODEL_FILE]
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"])
    model.load_state_dict(load_file(str(tmp_path / "export" / MODEL_FILE)))  # strict
    x = torch.randn(2, 3, 16, 16)
    state.model.eval(), model.eval()
    assert torch.equal(model(x), state.model(x))


def test_export_and_eval_loading_take_a_checkpoint_on_s3(tmp_path, s3_upload):
    """A multi-node run keeps its checkpoints on cloud storage: export and eval/predict read them from there."""
    from raytrain_cls.commands.inference import load_model

    state = new_state()
    state.epoch = 3
    uri = s3_upload(state.save(tmp_path / "epoch-0003", metrics={"eval_top1": 60.0}), "unit/faults/epoch-0003")
    info = export_checkpoint(uri, tmp_path / "export")
    assert info["source_checkpoint"] == uri and info["epoch"] == 3 and info["weights"] == [MODEL_FILE]
    loaded = load_model(uri)
    assert loaded.classes == ["a", "b", "c", "d"] and loaded.config.model.model == "test_resnet"
    x = torch.randn(2, 3, 16, 16)
    state.model.eval()
    assert torch.equal(loaded.model(x), state.model(x))


def test_export_of_a_damaged_checkpoint_fails_cleanly(tmp_path):
    ckpt = new_state().save(tmp_path / "ckpt")
    (ckpt / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out" / MODEL_FILE).exists()
    assert not (tmp_path / "out").exists()  # nothing half-made: not even the folder


def test_an_export_records_its_checksums_and_a_corrupt_one_is_refused(tmp_path):
    from raytrain_cls.commands.inference import load_model

    ckpt = new_state().save(tmp_path / "ckpt")
    info = export_checkpoint(ckpt, tmp_path / "export")
    assert info["files"][MODEL_FILE]["sha256"] == file_digest(tmp_path / "export" / MODEL_FILE)["sha256"]
    load_model(tmp_path / "export")  # verifies, then loads
    weights = tmp_path / "export" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0x04
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_model(tmp_path / "export")


def test_a_failed_export_write_removes_what_it_wrote(tmp_path, monkeypatch):
    import raytrain_cls.commands.export as export

    ckpt = new_state().save(tmp_path / "ckpt")

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "atomic_write_text", disk_full)  # the weights are written, config.json is not
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(ckpt, tmp_path / "new" / "export")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OSError):
        export_checkpoint(ckpt, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # a user's folder keeps its files


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_dirs_of_dead_writers_on_this_host_are_removed_and_nothing_else(tmp_path):
    """A worker killed while Ray still held its checkpoint's staging dir leaves it in the temp dir: the next
    staging_dir() on the host removes it. A live writer's, another host's and a foreign dir stay."""
    host = socket.gethostname()
    dead = tmp_path / f"{STAGING_PREFIX}{host}-{_dead_pid()}-abc"
    alive = tmp_path / f"{STAGING_PREFIX}{host}-{os.getpid()}-abc"
    other_host = tmp_path / f"{STAGING_PREFIX}not-{host}-{_dead_pid()}-abc"
    unparsed = tmp_path / f"{STAGING_PREFIX}{host}-x1-abc"
    user_dir = tmp_path / "my-checkpoints"
    for folder in (dead, alive, other_host, unparsed, user_dir):
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"weights")

    assert remove_orphaned_staging(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, other_host, unparsed, user_dir))


def test_a_staging_dir_names_its_writer_and_tolerates_ray_deleting_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with staging_dir() as folder:
        assert Path(folder).name.startswith(f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-")
        shutil.rmtree(folder)  # Ray's delete_local_checkpoint_after_upload
    assert list(tmp_path.iterdir()) == []
