"""raytrain_cls.core.state: checkpoint round trip, checksums verified before anything loads, weights of another
architecture refused by name, and refusal of anything that is not plain data."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import timm
import torch

from raytrain_cls.core.config import Config
from raytrain_cls.core.model import build_ema
from raytrain_cls.core.optim import build_optimizer, build_scheduler
from raytrain_cls.core.state import (
    EMA_FILE,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    UNVERIFIED_VERSION,
    CheckpointError,
    TrainState,
    check_architecture,
    file_digest,
    load_weights,
    save_weights,
    verified_meta,
)
from raytrain_cls.core.storage import local_dir

CFG = (
    Config()
    .update(
        {
            "dataset": "digits",
            "model": "test_resnet",
            "lr": 0.1,
            "epochs": 6,
            "warmup_epochs": 1,
            "model_ema": True,
            "model_ema_decay": 0.9,
        }
    )
    .validate()
)


def make_state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=4)
    ema = build_ema(CFG, model)
    optimizer = build_optimizer(CFG, model)
    scheduler, _ = build_scheduler(CFG, optimizer, updates_per_epoch=2)
    return TrainState(CFG.to_dict(), model, optimizer, scheduler, ema=ema)


def trained_state() -> TrainState:
    """A state with non-trivial optimizer buffers, BN statistics, scheduler position, EMA, counters and best."""
    state = make_state(0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(state.model(x), y)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.ema.update(state.model, step=step + 1)
    state.scheduler.step(2)
    state.epoch, state.num_updates, state.best_metric, state.best_epoch = 1, 3, 87.5, 0
    return state


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_round_trip(tmp_path):
    src = trained_state()
    src.save(tmp_path / "ckpt", metrics={"top1": 87.5})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE}

    dst = make_state(1)  # different initial weights
    assert not torch.equal(next(dst.model.parameters()), next(src.model.parameters()))
    meta = dst.load(tmp_path / "ckpt")

    assert_same_tensors(src.model.state_dict(), dst.model.state_dict())  # weights and BN buffers, bit for bit
    assert_same_tensors(src.ema.module.state_dict(), dst.ema.module.state_dict())
    so, do = src.optimizer.state_dict(), dst.optimizer.state_dict()
    assert so["param_groups"] == do["param_groups"]
    assert so["state"].keys() == do["state"].keys() and so["state"]
    for k in so["state"]:
        assert_same_tensors(so["state"][k], do["state"][k])
    assert dst.scheduler.state_dict() == src.scheduler.state_dict()
    assert (dst.epoch, dst.num_updates, dst.best_metric, dst.best_epoch) == (1, 3, 87.5, 0)
    assert dst.start_epoch == 2
    assert meta["config"] == CFG.to_dict() and meta["metrics"] == {"top1": 87.5} and meta["epoch"] == 1
    assert Config.from_dict(meta["config"]) == CFG  # the config comes back as a plain dict


def test_a_start_checkpoint_under_a_uri_loads_like_a_local_one(tmp_path, s3_upload):
    """--resume s3://.../epoch-0003: the worker reads it through storage.local_dir, which downloads it first."""
    src = trained_state()
    src.save(tmp_path / "ckpt")
    uri = s3_upload(tmp_path / "ckpt", "unit/state/epoch-0001")
    dst = make_state(1)
    with local_dir(uri) as d:
        assert d != tmp_path / "ckpt" and (d / META_FILE).is_file()
        dst.load(d)
    assert_same_tensors(src.model.state_dict(), dst.model.state_dict())
    assert (dst.epoch, dst.num_updates, dst.best_metric) == (1, 3, 87.5)


def test_rng_state_restored(tmp_path):
    """After a load the python, numpy and torch RNGs continue exactly where they were at save time."""
    state = make_state(0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state.save(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    make_state(5).load(tmp_path)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_load_without_optimizer(tmp_path):
    trained_state().save(tmp_path)
    dst = make_state(1)
    before = dst.optimizer.state_dict()
    dst.load(tmp_path, load_optimizer=False)
    assert dst.optimizer.state_dict()["state"] == before["state"] == {}
    assert dst.num_updates == 3


def test_state_file_is_plain_data(tmp_path):
    """state.pt loads with weights_only=True: only tensors and plain Python values inside."""
    trained_state().save(tmp_path)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "counters", "best", "position", "ranks", "aux"}
    json.loads((tmp_path / META_FILE).read_text())


def test_tied_weights_round_trip(tmp_path):
    """Tensors sharing storage (tied embeddings) are written once and restored into both names."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    torch.manual_seed(0)
    src = Tied()
    save_weights(src, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    dst = Tied()
    load_weights(dst, tmp_path / "w.safetensors")
    assert torch.equal(dst.a.weight, src.a.weight) and dst.b.weight is dst.a.weight


class Exploit:
    """Unpickling this runs os.system: what a tampered checkpoint would try."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "ckpt"
    make_state(0).save(d)
    return d


def reseal(directory) -> None:
    """Record the current checksums in meta.json: a tampered state.pt whose author also rewrote the checksums,
    so that what is tested is the unpickling refusal behind them."""
    meta = json.loads((directory / META_FILE).read_text())
    meta["files"] = {name: file_digest(directory / name) for name in meta["files"]}
    (directory / META_FILE).write_text(json.dumps(meta))


def flip_one_bit(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_file_is_recorded_with_its_size_and_sha256(saved):
    files = json.loads((saved / META_FILE).read_text())["files"]
    assert sorted(files) == sorted([MODEL_FILE, EMA_FILE, STATE_FILE])
    assert files[MODEL_FILE] == file_digest(saved / MODEL_FILE)
    assert files[MODEL_FILE]["bytes"] == (saved / MODEL_FILE).stat().st_size


@pytest.mark.parametrize("name", [MODEL_FILE, EMA_FILE, STATE_FILE])
def test_a_flipped_bit_is_refused_naming_the_file(saved, name):
    flip_one_bit(saved / name)  # inside the tensor data: the file still parses, its weights are wrong
    state = make_state(1)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{name}: corrupt"):
        state.load(saved)
    assert_same_tensors(before, state.model.state_dict())  # nothing was loaded


def test_a_missing_file_is_refused_naming_it(saved):
    (saved / EMA_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{EMA_FILE}: missing"):
        verified_meta(saved)


def test_a_listed_name_outside_the_checkpoint_is_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["files"]["../elsewhere"] = meta["files"][MODEL_FILE]
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        verified_meta(saved)


def test_checksums_stripped_from_a_current_checkpoint_are_refused(saved):
    meta = json.loads((saved / META_FILE).read_text())
    del meta["files"]
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no checksums"):
        make_state(1).load(saved)


def test_a_checkpoint_of_the_version_before_checksums_still_loads(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["format_version"] = UNVERIFIED_VERSION
    del meta["files"]
    (saved / META_FILE).write_text(json.dumps(meta))
    make_state(1).load(saved)


def test_weights_of_another_architecture_are_refused_by_name(saved):
    other = timm.create_model("test_resnet", num_classes=7)  # another class count: the head differs
    with pytest.raises(CheckpointError, match=r"another architecture.*tensor\(s\) of another shape.*fc"):
        load_weights(other, saved / MODEL_FILE)
    with torch.device("meta"):  # the driver's check: no weights allocated
        meta_model = timm.create_model("test_vit", num_classes=4)
    with pytest.raises(CheckpointError, match="missing"):
        check_architecture(meta_model, saved / MODEL_FILE)


def test_malicious_torch_save_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Exploit(marker)}, saved / STATE_FILE)
    reseal(saved)
    with pytest.raises(CheckpointError, match="refusing to load"):
        make_state(1).load(saved)
    assert not marker.exists()


def test_malicious_raw_pickle_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    with open(saved / STATE_FILE, "wb") as f:
        pickle.dump(Exploit(marker), f, protocol=2)
    reseal(saved)
    with pytest.raises(CheckpointError, match="refusing to load"):
        make_state(1).load(saved)
    assert not marker.exists()


def test_arbitrary_class_is_refused(saved):
    """Even a harmless custom class is not on weights_only's allow list."""
    torch.save({"counters": Config()}, saved / STATE_FILE)
    reseal(saved)
    with pytest.raises(CheckpointError, match="refusing to load"):
        make_state(1).load(saved)


def test_garbage_state_file(saved):
    (saved / STATE_FILE).write_bytes(b"not a checkpoint")
    reseal(saved)
    with pytest.raises(CheckpointError):
        make_state(1).load(saved)


def test_wrong_format_version(saved):
    meta = json.loads((saved / META_FILE).read_text())
    meta["format_version"] = 999
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 999"):
        make_state(1).load(saved)


def test_missing_meta(saved):
    (saved / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a readable raytrain-cls checkpoint"):
        make_state(1).load(saved)


def test_corrupt_meta(saved):
    (saved / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable raytrain-cls checkpoint"):
        make_state(1).load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError):
        make_state(1).load(tmp_path / "nope")


def test_meta_that_is_not_an_object(saved):
    (saved / META_FILE).write_text("[]")
    with pytest.raises(CheckpointError):
        make_state(1).load(saved)
