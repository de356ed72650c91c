"""Tune trials that train in Tune's own trial process (`tune --in-process`, run/trial_process.py): the checkpoints
such a trial keeps itself (checkpointer.RunDirCheckpoints), what it tells Tune, where its start-up counts from, and
the Ray internals it relies on."""

from __future__ import annotations

import csv
import gc
import inspect
import json
from types import SimpleNamespace

import pytest
import timm
import torch

from raytrain_cls.core.config import load_config
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.core.state import TrainState, verified_meta
from raytrain_cls.run import trial_process
from raytrain_cls.run.checkpointer import RunDirCheckpoints, checkpoint_name, report, restore
from raytrain_cls.run.in_process import process_device
from raytrain_cls.run.report import PLACEMENT_GROUP_METRIC
from raytrain_cls.run.startup import breakdown
from raytrain_cls.run.worker import StopRequested

CFG = load_config("digits", {"model": "test_resnet", "checkpoint_hist": 2})


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    return TrainState(CFG.to_dict(), model, build_optimizer(CFG, model))


def epoch_metrics(epoch: int, top1: float) -> dict:
    return dict(epoch=epoch, eval_top1=top1, eval_loss=1.0, train_loss=1.0, lr=0.1, workers="1", grad_accum="1")


def report_epochs(state: TrainState, keeper: RunDirCheckpoints, scores: list[float]) -> None:
    for epoch, top1 in enumerate(scores):
        state.epoch = epoch
        report(state, epoch_metrics(epoch, top1), 0, 1, checkpoint_name(epoch), keeper=keeper)


def test_each_epoch_is_written_complete_kept_by_ray_trains_rule_and_told_to_tune(tmp_path):
    told = []
    keeper = RunDirCheckpoints(str(tmp_path), CFG, told.append)
    report_epochs(make_state(), keeper, [50.0, 80.0, 70.0, 60.0])

    # --checkpoint-hist 2: the two best (epochs 1 and 2) and the latest (3); nothing half-written left behind
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert not list(tmp_path.glob(".*"))
    verified_meta(tmp_path / "epoch-0003")  # complete: every file there with its checksum
    assert [m["epoch"] for m in told] == [0, 1, 2, 3]  # one Tune iteration per epoch
    assert told[-1]["checkpoint_path"] == str(tmp_path / "epoch-0003")
    # No placement group to report: the search's clean-up would remove Tune's own group of the reused process
    assert PLACEMENT_GROUP_METRIC not in told[-1]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["best_checkpoint"] == str(tmp_path / "epoch-0001") and result["best_value"] == 80.0
    assert result["latest_checkpoint"] == str(tmp_path / "epoch-0003") and result["last_metrics"]["epoch"] == 3
    with (tmp_path / "summary.csv").open() as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2, 3]


def test_a_recovery_checkpoint_is_kept_as_the_latest_until_an_epoch_replaces_it_and_never_told_to_tune(tmp_path):
    told = []
    keeper = RunDirCheckpoints(str(tmp_path), CFG, told.append)
    state = make_state()
    report_epochs(state, keeper, [50.0, 80.0])
    recovery = dict(epoch=2, step=5, num_updates=105, recovery=1, eval_top1=-1.0)
    report(state, recovery, 0, 1, checkpoint_name(2, 105), keeper=keeper)
    assert (tmp_path / "epoch-0002-step-0000105").is_dir() and len(told) == 2
    assert json.loads((tmp_path / "result.json").read_text())["last_metrics"]["epoch"] == 1  # no epoch row yet

    state.epoch = 2
    report(state, epoch_metrics(2, 70.0), 0, 1, checkpoint_name(2), keeper=keeper)
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]


def test_the_same_epoch_trained_again_replaces_its_checkpoint(tmp_path):
    keeper = RunDirCheckpoints(str(tmp_path), CFG, lambda metrics: None)
    report_epochs(make_state(seed=0), keeper, [50.0])
    first = (tmp_path / "epoch-0000" / "model.safetensors").read_bytes()
    report_epochs(make_state(seed=1), keeper, [55.0])
    assert (tmp_path / "epoch-0000" / "model.safetensors").read_bytes() != first
    verified_meta(tmp_path / "epoch-0000")


def test_a_restarted_trial_continues_from_its_newest_complete_checkpoint(tmp_path):
    keeper = RunDirCheckpoints(str(tmp_path), CFG, lambda metrics: None)
    report_epochs(make_state(seed=0), keeper, [50.0, 80.0])
    (tmp_path / ".epoch-0002.partial").mkdir()  # what a trial killed while writing leaves

    cfg = SimpleNamespace(
        resolved=SimpleNamespace(run_dir=str(tmp_path), init_checkpoint=None),
        checkpoint=SimpleNamespace(initial_checkpoint="", no_resume_opt=False),
    )
    again = RunDirCheckpoints(str(tmp_path), CFG, lambda metrics: None)
    state = make_state(seed=1)
    loaded, own = restore(state, cfg, 0, 1, keeper=again)
    assert (loaded, own) == (str(tmp_path / "epoch-0001"), True) and state.epoch == 1
    assert again.latest == tmp_path / "epoch-0001"


def test_a_trial_counts_its_start_up_from_its_process_first_then_from_taking_the_trial(monkeypatch):
    monkeypatch.setattr(trial_process, "_trials_taken", 0)
    first = trial_process.trial_stamps(entered=105.0, imported_at=100.0)
    assert first == {"in_process": 105.0, "process": 100.0}
    reused = trial_process.trial_stamps(entered=205.0, imported_at=100.0)
    assert reused == {"in_process": 205.0}  # Tune reused the process: its imports were done long before


def test_an_in_process_trials_start_up_has_its_own_phases():
    stamps = dict(process=100.0, in_process=104.0, ray_ready=104.1, resolved=104.5, fit=104.6, first_step=105.0)
    stamps.update(worker_process=90.0, worker_imported=95.0)  # the WorkerRun adds these: no phase of their own
    result = breakdown(stamps)
    assert result["until"] == "first_step" and result["total_s"] == 5.0
    labels = [label for label, _ in result["phases"]]
    assert labels[0] == "trial process imports (torch, timm, raytrain_cls)"
    assert not any("Ray Train" in label for label in labels)


def test_a_stop_ends_the_loop_at_the_next_update_as_tune_takes_a_graceful_end():
    from raytrain_cls.run.worker import WorkerRun

    stopped = SimpleNamespace(where=SimpleNamespace(stop_requested=lambda: True))
    with pytest.raises(StopRequested) as e:
        WorkerRun.recovery_checkpoint(stopped, epoch=0, start_batch=0, progress=None)
    # Tune's trial thread treats SystemExit(0) as the function ending without an error (ray.air RunnerThread).
    assert isinstance(e.value, SystemExit) and e.value.code == 0


def test_the_ray_internals_an_in_process_trial_relies_on_are_still_there():
    """Not public APIs: a Ray upgrade that moves them fails here, not in a search that hangs."""
    from ray.train._internal import session
    from ray.tune.trainable.function_trainable import FunctionTrainable

    assert session.get_session() is None and trial_process.tune_stop_requested() is False
    # Tune ends a trial's thread through the session's stop_event (set by finish(), which reuse calls) ...
    assert "self.stop_event.set()" in inspect.getsource(session._TrainSession.finish)
    assert "self.stop_event = threading.Event()" in inspect.getsource(session._TrainSession.reset)
    # ... and reuses the process only if the thread ended within this many seconds (default 2).
    assert trial_process.THREAD_TIMEOUT_ENV in inspect.getsource(FunctionTrainable.reset_config)


def test_the_trial_trains_on_the_gpu_ray_granted_it_or_says_why_it_cannot():
    assert process_device(use_gpu=False).type == "cpu"
    if torch.cuda.is_available():
        assert process_device(use_gpu=True) == torch.device("cuda:0")
    else:
        with pytest.raises(UserError, match="torch sees no CUDA device"):
            process_device(use_gpu=True)


def test_a_reused_process_frees_what_the_trial_before_it_left_in_reference_cycles():
    import weakref

    class Run:  # a finished trial's WorkerRun: its loop's callbacks point back at it
        def __init__(self):
            self.model = torch.nn.Linear(4, 4)
            self.callback = self.run

        def run(self):
            pass

    gc.disable()  # only free_previous_trial may collect here
    try:
        left = Run()
        model = weakref.ref(left.model)
        del left
        assert model() is not None  # a cycle: not freed when the last name goes
        trial_process.free_previous_trial()
        assert model() is None
    finally:
        gc.enable()
