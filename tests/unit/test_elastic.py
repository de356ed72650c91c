"""Elastic training (--num-workers MIN:MAX) without Ray: the global batch kept at every size, refusals at start
with the sizes that work, an epoch that trains each sample once across resizes, the newest complete checkpoint
found on disk, the Tune option, and the Ray internals the resize checkpoint leans on."""

from __future__ import annotations

import math

import pytest
import timm
from records import resolved_record

from raytrain_cls.commands.cli import build_parser, overrides_of
from raytrain_cls.core.config import Config, ConfigError, load_config
from raytrain_cls.core.elastic import check_elastic_range, global_batch_of, split_for, split_global_batch
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.core.state import META_FILE, MODEL_FILE, TrainState
from raytrain_cls.data.sampler import ResumableDistributedSampler
from raytrain_cls.run.capacity import Capacity
from raytrain_cls.run.checkpointer import checkpoint_name, newest_written, progress_key, unregistered_since
from raytrain_cls.run.driver import resolve_scaling, workers_phrase
from raytrain_cls.run.elastic import CheckpointRequests
from raytrain_cls.run.tune import parse_search, trial_base, trial_min_workers

DIGITS = {"dataset": "digits"}


def elastic(workers, **more) -> Config:
    return load_config(overrides={**DIGITS, "num_workers": workers, **more})


# ---- the global batch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "total, batch, workers, expected",
    [
        (128, 64, 2, (64, 1)),
        (128, 64, 1, (64, 2)),  # half the workers: twice the accumulation
        (192, 64, 2, (48, 2)),  # 96 each: no whole count of 64s, so two micro-batches of 48
        (96, 32, 4, (24, 1)),
        (150, 50, 2, (25, 3)),
    ],
)
def test_a_split_keeps_the_global_batch_with_micro_batches_no_larger(total, batch, workers, expected):
    split = split_global_batch(total, batch, workers)
    assert (split.batch_size, split.accum_steps) == expected
    assert split.global_batch == total and split.batch_size <= batch


def test_a_share_that_is_not_whole_has_no_split():
    assert split_global_batch(256, 64, 3) is None


@pytest.mark.parametrize("batch, low, high, accum", [(32, 1, 2, 1), (48, 1, 4, 1), (48, 1, 3, 2), (30, 2, 6, 1)])
def test_every_size_of_an_accepted_range_trains_the_same_global_batch(batch, low, high, accum):
    cfg = elastic([low, high], batch_size=batch, grad_accum_steps=accum)
    total = batch * high * accum
    assert global_batch_of(cfg) == total
    splits = check_elastic_range(cfg)
    assert sorted(splits) == list(range(low, high + 1))
    for n, split in splits.items():
        assert split == split_for(cfg, n)
        assert split.global_batch == total and split.batch_size <= batch


def test_a_fixed_count_keeps_its_batch_and_accumulation():
    cfg = elastic(3, batch_size=20, grad_accum_steps=2)
    split = split_for(cfg, 3)
    assert (split.batch_size, split.accum_steps, split.global_batch) == (20, 2, 120)


def test_a_range_that_cannot_keep_the_global_batch_is_refused_with_what_would_work():
    cfg = elastic("3:4", batch_size=64)
    with pytest.raises(ConfigError) as e:
        check_elastic_range(cfg)
    assert e.value.key == "scaling.num_workers" and e.value.value == "3:4"
    assert "global batch 256 (64 x 4 workers x 1 accumulation steps) cannot be kept on 3 worker(s)" in e.value.reason
    suggested = [int(b) for b in e.value.reason.split("--batch-size ")[1].split(" or ")]
    for batch in suggested:  # each suggestion really works
        check_elastic_range(elastic("3:4", batch_size=batch))


def test_batch_mixup_refuses_a_size_whose_micro_batch_would_be_odd():
    cfg = elastic("2:3", batch_size=10, mixup=0.2)
    check_elastic_range(cfg)  # without the even rule: 2 x (3 x 5) and 3 x 10
    with pytest.raises(ConfigError, match=r"on 2 worker\(s\) \(an odd micro-batch"):
        check_elastic_range(cfg, even_batches=True)


# ---- the config ------------------------------------------------------------------------------------------------
def test_the_command_line_and_yaml_spellings_of_a_range():
    args = build_parser().parse_args(["train", "--num-workers", "1:4", "--elastic-resize-interval", "5"])
    cfg = load_config(overrides={**DIGITS, **overrides_of(args)})
    assert cfg.scaling.num_workers == [1, 4] and cfg.scaling.worker_range() == (1, 4)
    assert cfg.scaling.elastic_resize_interval == 5.0
    assert load_config(overrides={**DIGITS, "scaling": {"num_workers": [2, 3]}}).scaling.worker_range() == (2, 3)
    assert load_config(overrides={**DIGITS, "num_workers": "2:2"}).scaling.num_workers == 2  # a fixed count
    assert load_config(overrides={**DIGITS, "num_workers": 3}).scaling.worker_range() is None


@pytest.mark.parametrize(
    "value, reason",
    [
        ("3:1", "MIN <= MAX"),
        ([0, 2], ">= 1"),
        ("two", "a worker count N or a range MIN:MAX"),
        ([1, 2, 3], "MIN <= MAX"),
    ],
)
def test_bad_ranges_are_refused_by_key(value, reason):
    with pytest.raises(ConfigError, match=reason) as e:
        load_config(overrides={**DIGITS, "num_workers": value})
    assert e.value.key.startswith("scaling.num_workers")


def test_a_bad_range_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--num-workers", "1-4"])
    assert "a worker count N or a range MIN:MAX" in capsys.readouterr().err


@pytest.mark.parametrize(
    "more, key",
    [
        ({"elastic_resize_interval": 5}, "scaling.elastic_resize_interval"),
        ({"num_workers": "1:2", "train_img_sizes": [24, 32]}, "data.train_img_sizes"),
        ({"num_workers": "1:2", "train_batches_per_epoch": 10}, "data.train_batches_per_epoch"),
    ],
)
def test_what_elastic_training_cannot_do_is_refused_by_key(more, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides={**DIGITS, **more})
    assert e.value.key == key


def test_the_capacity_check_needs_min_workers_and_sizes_the_run_at_max():
    cfg = elastic("1:2")
    one_cpu = Capacity({"CPU": 1}, node_cpus=[1])
    assert resolve_scaling(cfg, one_cpu)[:2] == (False, 2)
    with pytest.raises(ConfigError, match="needs 2 CPUs") as e:
        resolve_scaling(elastic("2:3"), one_cpu)
    assert e.value.value == "2:3"
    phrase = workers_phrase(resolved_record(num_workers=4, min_workers=1))
    assert phrase == "1 to 4 CPU workers"


# ---- an epoch across resizes ------------------------------------------------------------------------------------
def ranks_batches(sampler_args: dict, world: int, batch: int, consumed: int) -> list[list[int]]:
    """Each rank's batches of samples from position ``consumed`` on (drop_last, as the training loader)."""
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(rank=rank, world_size=world, **sampler_args)
        sampler.set_epoch(3, consumed)
        ids = list(sampler)
        out.append([ids[i : i + batch] for i in range(0, len(ids) - batch + 1, batch)])
    return out


def test_an_epoch_resized_twice_trains_each_sample_once_in_whole_global_batches():
    """1 worker, then 3, then 2 (resumed at update boundaries): the samples trained are the epoch order's first
    whole global batches, each exactly once, and every update is one global batch."""
    num_samples, total = 1000, 96  # 10 updates of 96; the last 40 samples are left out
    cfg = elastic("1:3", batch_size=32)
    trained, consumed = [], 0
    for world, updates in ((1, 3), (3, 4), (2, None)):
        split = split_for(cfg, world)
        args = dict(num_samples=num_samples, seed=7, whole_batches=split.global_batch)
        batches = ranks_batches(args, world, split.batch_size, consumed)
        steps = len(batches[0]) if updates is None else updates * split.accum_steps
        assert all(len(b) == len(batches[0]) for b in batches) and len(batches[0]) % split.accum_steps == 0
        for step in range(steps):
            trained += [i for rank in batches for i in rank[step]]
        consumed += steps * split.batch_size * world
        assert consumed % total == 0  # every update a whole global batch
    whole = ResumableDistributedSampler(num_samples, 0, 1, seed=7)
    whole.set_epoch(3)
    order = whole.order()
    assert consumed == num_samples // total * total
    assert sorted(trained) == sorted(order[:consumed].tolist())
    assert len(set(trained)) == len(trained)


# ---- the newest complete checkpoint ----------------------------------------------------------------------------
def write_checkpoint(run_dir, epoch: int, num_updates=None):
    model = timm.create_model("test_resnet", num_classes=4)
    cfg = elastic("1:2")
    state = TrainState(cfg.to_dict(), model, build_optimizer(cfg, model))
    return state.save(run_dir / checkpoint_name(epoch, num_updates))


def test_checkpoints_rank_by_progress():
    names = ["epoch-0001", "epoch-0002-step-0000030", "epoch-0001-step-0000012", "epoch-0002", "epoch-0000"]
    ranked = sorted(names, key=progress_key)
    assert ranked == ["epoch-0000", "epoch-0001-step-0000012", "epoch-0001", "epoch-0002-step-0000030", "epoch-0002"]
    assert progress_key("notes") is None and progress_key("epoch-1x") is None


def test_the_newest_complete_checkpoint_is_found_and_a_half_copied_one_skipped(tmp_path):
    write_checkpoint(tmp_path, 0)
    registered = write_checkpoint(tmp_path, 1, 30)
    assert newest_written(tmp_path) == registered
    assert newest_written(tmp_path, after=registered.name) is None
    newer = write_checkpoint(tmp_path, 1, 36)
    assert newest_written(tmp_path, after=registered.name) == newer
    with (newer / MODEL_FILE).open("r+b") as f:  # still being copied in: its weights file is short
        f.truncate(100)
    assert newest_written(tmp_path, after=registered.name) is None
    assert newest_written(tmp_path) == registered
    (tmp_path / "epoch-0002").mkdir()  # a folder with no meta.json yet
    assert newest_written(tmp_path) == registered
    assert not (tmp_path / "epoch-0002" / META_FILE).exists()


def test_the_checkpoints_ray_missed_are_listed_oldest_first_and_only_complete_ones(tmp_path):
    registered = write_checkpoint(tmp_path, 0)
    lost_epoch_end = write_checkpoint(tmp_path, 1)  # its report was still queued when the group went
    half = write_checkpoint(tmp_path, 2, 50)
    (half / MODEL_FILE).write_bytes(b"short")
    newest = write_checkpoint(tmp_path, 2, 52)
    assert unregistered_since(tmp_path, registered.name) == [lost_epoch_end, newest]
    assert unregistered_since(tmp_path, newest.name) == []
    assert unregistered_since(tmp_path, None)[0] == registered


def test_a_restarted_group_reports_the_first_groups_start_up_stamps(monkeypatch):
    from raytrain_cls.run import worker

    first = {"fit": 100.0, "worker_process": 104.0, "first_step": 110.0}
    restarted = {"fit": 100.0, "worker_process": 150.0}
    monkeypatch.setattr(worker, "read_meta", lambda path: {"metrics": {"startup": first}})
    assert worker.first_group_stamps("ckpt", restarted) == first  # the same fit: the run's own start
    assert worker.first_group_stamps("ckpt", {"fit": 200.0}) == {"fit": 200.0}  # a --resume: its own
    monkeypatch.setattr(worker, "read_meta", lambda path: {"metrics": {}})
    assert worker.first_group_stamps("ckpt", restarted) == restarted


# ---- the resize checkpoint's ledger and Tune ------------------------------------------------------------------
def test_a_request_is_wanted_until_served():
    ledger = CheckpointRequests()
    assert ledger.wanted() == 0
    first = ledger.request()
    assert ledger.wanted() == first
    second = ledger.request()
    assert ledger.wanted() == second
    ledger.serve(second)
    assert ledger.wanted() == 0


def test_tune_trials_take_a_worker_range():
    spec = parse_search({}, cli={"workers_per_trial": "1:2"})
    assert spec.workers_per_trial == [1, 2] and trial_min_workers(spec) == 1
    assert trial_base(load_config(overrides=DIGITS), spec).scaling.worker_range() == (1, 2)
    assert parse_search({"workers_per_trial": [2, 4]}).workers_per_trial == [2, 4]
    assert trial_min_workers(parse_search({"workers_per_trial": 3})) == 3
    for bad in ("2:1", [0, 1], 1.5, "x"):
        with pytest.raises(ConfigError) as e:
            parse_search({"workers_per_trial": bad})
        assert e.value.key == "search.workers_per_trial"


# ---- Ray internals the resize checkpoint leans on ---------------------------------------------------------------
def test_ray_trains_controller_still_has_what_the_resize_checkpoint_uses():
    """A Ray upgrade that renames these breaks run/elastic.py: this fails first."""
    import inspect

    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller import controller
    from ray.train.v2._internal.execution.controller.state import ResizingState, RunningState
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raytrain_cls.run.elastic import resize_callback

    assert list(inspect.signature(ControllerCallback.after_controller_state_update).parameters) == [
        "self",
        "previous_state",
        "current_state",
    ]
    source = inspect.getsource(controller)
    # a running group's resize: RunningState -> ResizingState, then the group is shut down and restarted
    assert "next_state = ResizingState(" in source and "_execute_resize_decision" in source
    assert issubclass(ResizingState, object) and issubclass(RunningState, object)
    # RunConfig callbacks that are not UserCallbacks go to the controller as they are
    assert "if not isinstance(cb, UserCallback)" in inspect.getsource(DataParallelTrainer._create_default_callbacks)
    assert isinstance(resize_callback("requests", "/tmp/run"), ControllerCallback)
    scaling = __import__("ray.train", fromlist=["ScalingConfig"]).ScalingConfig(
        num_workers=(1, 2), elastic_resize_monitor_interval_s=2.0
    )
    assert scaling.elasticity_enabled and (scaling.min_workers, scaling.max_workers) == (1, 2)


def test_the_lr_of_an_elastic_run_is_resolved_at_its_largest_size():
    from raytrain_cls.core.optim import resolve_lr

    cfg = elastic("1:4", batch_size=32, lr_base=0.1, lr_base_size=256, lr=None, opt="sgd")
    lr, rule = resolve_lr(cfg, 4)
    assert math.isclose(lr, 0.1 * 128 / 256) and "x 4 workers" in rule
