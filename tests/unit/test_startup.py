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
