"""The start-up breakdown (startup.py): phases between wall-clock stamps, robust to missing and early stamps."""

import subprocess
import sys
import time

import pytest

from raytrain_cls.run.startup import PHASES, STAMPS, breakdown, describe, process_start, stamp


def stamps_every_second():
    return {name: 100.0 + i for i, name in enumerate(STAMPS)}


def test_every_stamp_present_gives_one_phase_each_and_the_total():
    result = breakdown(stamps_every_second())
    assert result["total_s"] == len(STAMPS) - 1
    assert result["until"] == "first_step"
    assert [label for label, _ in result["phases"]] == [label for _, label in PHASES[1:]]
    assert all(seconds == 1.0 for _, seconds in result["phases"])


def test_a_missing_stamp_merges_its_phase_into_the_next():
    stamps = stamps_every_second()
    del stamps["worker_imported"]
    phases = dict(breakdown(stamps)["phases"])
    assert (
        phases["worker start (Ray worker, torch, process group) + train function imports (timm, raytrain_cls)"] == 2.0
    )
    assert sum(phases.values()) == breakdown(stamps)["total_s"] == len(STAMPS) - 1


def test_a_worker_process_older_than_the_fit_is_left_out_not_counted_negative():
    stamps = stamps_every_second()
    stamps["worker_process"] = stamps["process"] - 50  # Ray handed the actor an idle, pre-started process
    result = breakdown(stamps)
    assert all(seconds >= 0 for _, seconds in result["phases"])
    assert (
        dict(result["phases"])["Ray Train controller + worker group + worker start (Ray worker, torch, process group)"]
        == 2.0
    )
    assert result["total_s"] == len(STAMPS) - 1


def test_a_tune_trial_without_a_process_stamp_starts_at_the_driver_stamp():
    stamps = stamps_every_second()
    del stamps["process"]
    result = breakdown(stamps)
    assert result["total_s"] == len(STAMPS) - 2
    assert result["phases"][0][0] == "pre-Ray checks (data set, model on the meta device, checkpoint)"


def test_a_run_that_never_stepped_says_how_far_it_got():
    stamps = {name: t for name, t in stamps_every_second().items() if name in ("driver", "ray_ready", "resolved")}
    result = breakdown(stamps)
    assert result["until"] == "resolved" and result["total_s"] == 3.0
    assert describe(result).startswith("Start-up 3.0 s to resolved: ")


def test_no_or_one_stamp_describes_nothing():
    assert breakdown({})["phases"] == [] and describe(breakdown({})) == ""
    assert describe(breakdown({"driver": 5.0})) == ""


def test_describe_names_every_phase_with_its_seconds():
    line = describe(breakdown(stamps_every_second()))
    assert line.startswith(f"Start-up {len(STAMPS) - 1:.1f} s to the first step: ")
    for _, label in PHASES[1:]:
        assert f"{label} 1.0 s" in line


def test_stamp_keeps_the_first_time_unless_told_when():
    stamps = {}
    stamp(stamps, "fit")
    first = stamps["fit"]
    time.sleep(0.01)
    stamp(stamps, "fit")
    assert stamps["fit"] == first
    stamp(stamps, "fit", at=1.0)
    assert stamps["fit"] == 1.0
    with pytest.raises(KeyError, match="unknown start-up stamp"):
        stamp(stamps, "warmup")


def test_process_start_is_when_the_process_started():
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "from raytrain_cls.run.startup import process_start; print(process_start())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # /proc counts in 10 ms ticks; the child started after `before` and long before it printed.
    assert before - 0.05 <= float(out) <= time.time()
    assert process_start() <= before


def test_a_command_never_trusts_an_os_clock_that_disagrees_with_its_own(monkeypatch):
    """A fresh VM's /proc put the process start 100 s before the command was typed: the command's own first
    stamp (raytrain_cls.IMPORTED_AT) replaces a figure from further back than an interpreter start can take."""
    import raytrain_cls
    import raytrain_cls.run.startup as startup

    imported = raytrain_cls.IMPORTED_AT
    monkeypatch.setattr(startup, "_os_process_start", lambda: imported - 104.8)
    assert process_start(command=True) == imported
    assert process_start() == imported - 104.8  # a Ray worker's may really be that old
    monkeypatch.setattr(startup, "_os_process_start", lambda: imported + 1.0)  # after the import: impossible
    assert process_start(command=True) == imported
    monkeypatch.setattr(startup, "_os_process_start", lambda: None)
    assert process_start(command=True) == imported
    monkeypatch.setattr(startup, "_os_process_start", lambda: imported - 0.04)  # an interpreter's start: kept
    assert process_start(command=True) == imported - 0.04


# ---- the private local Ray's start (run/local_ray.py) -------------------------------------------------------------
def test_the_private_ray_asks_for_the_coordinator_the_train_controller_waits_for(monkeypatch):
    """Created as soon as the node is up, Ray Data's coordinator starts while the Train controller does."""
    import types

    import ray
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    from raytrain_cls.run import local_ray

    calls = []
    monkeypatch.setattr(
        ray, "init", lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(address_info={"gcs_address": "a"})
    )
    monkeypatch.setattr(coordinator, "get_or_create_autoscaling_coordinator", lambda: calls.append(("coordinator",)))
    monkeypatch.setattr(local_ray, "_started", [])
    local_ray.start_private_ray()
    assert [c[0] for c in calls] == ["init", "coordinator"]
    assert calls[0][1]["address"] == "local" and calls[0][1]["include_dashboard"] is False
    assert local_ray._started == ["a"]
    calls.clear()
    local_ray.start_private_ray(for_ray_train=False)  # eval's plain tasks
    assert [c[0] for c in calls] == ["init"]


def test_ray_train_still_gets_or_creates_the_same_named_detached_coordinator():
    """A Ray upgrade that renames the coordinator or stops Train asking for it makes the early creation useless (or
    a second actor): this fails first."""
    import inspect

    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client
    from ray.train.v2._internal.execution.scaling_policy.scaling_policy import ScalingPolicy

    made = inspect.getsource(coordinator.get_or_create_autoscaling_coordinator)
    for part in ('name="AutoscalingCoordinator"', "get_if_exists=True", 'lifetime="detached"'):
        assert part in made
    assert "get_or_create_autoscaling_coordinator()" in inspect.getsource(client.TrainAutoscalingCoordinatorClient)
    # every run's controller registers its resources with it when it starts, before the workers
    assert "TrainAutoscalingCoordinatorClient(" in inspect.getsource(ScalingPolicy.after_controller_start)


def test_only_the_ray_this_process_started_counts_as_private(monkeypatch):
    import types

    import ray

    from raytrain_cls.run import local_ray

    monkeypatch.setattr(local_ray, "_started", ["10.0.0.1:6379"])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for address, private in (("10.0.0.1:6379", True), ("10.0.0.2:6379", False)):
        monkeypatch.setattr(ray, "get_runtime_context", lambda a=address: types.SimpleNamespace(gcs_address=a))
        assert local_ray.started_private_ray() is private
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert local_ray.started_private_ray() is False
