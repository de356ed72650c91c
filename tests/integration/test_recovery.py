"""Fault recovery on a real local Ray: a SIGKILLed worker, a SIGKILLed driver (with its whole Ray), and a resume
onto a different number of workers. The promise under test: the run finishes as if nothing had happened."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain_cls.commands.cli import EXIT_OK, main
from raytrain_cls.core.state import MODEL_FILE, read_meta
from raytrain_cls.run.checkpointer import staging_dirs

pytestmark = pytest.mark.integration

EPOCHS = 5
UPDATES_PER_EPOCH = 22  # digits: 1438 train samples, batch 32 x 2 workers, drop_last
# A tiny model keeps checkpoints small, a recovery checkpoint every 4 updates keeps the latest one mid-epoch.
COMMON = [
    "--num-workers",  # DDP: a resume on another worker count is part of what is under test
    "2",
    "--model",
    "test_resnet",
    "--epochs",
    str(EPOCHS),
    "--recovery-interval",
    "4",
    "--checkpoint-hist",
    "100",
    "--max-failures",
    "1",
    "--log-interval",
    "100",
]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def summary_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "summary.csv").open() as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def final_weights(run_dir: Path) -> dict:
    # Compared tensor by tensor: safetensors writes its metadata keys in hash order, so file bytes may differ.
    return load_file(str(run_dir / f"epoch-{EPOCHS - 1:04d}" / MODEL_FILE))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", *COMMON, "--output", str(out), "--experiment", "straight"]) == EXIT_OK
    return out / "straight"


def train_killing_a_worker(ray_processes, args: list, run_dir: Path, timeout: float = 120) -> list:
    """`raytrain-cls train ARGS` in a thread; one of its Ray Train workers is SIGKILLed from outside, mid-epoch,
    once epoch 1 has written a recovery checkpoint. Returns the command's exit codes (one, when it ended)."""
    codes = []
    runner = threading.Thread(target=lambda: codes.append(main(["train", *args])))
    runner.start()
    wait_for(lambda: list(run_dir.glob("epoch-0001-step-*")), timeout, "a recovery checkpoint in epoch 1")
    victims = ray_processes("ray::RayTrainWorker")
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    runner.join(timeout=400)
    return codes


def test_a_killed_worker_is_replaced_and_the_result_is_bitwise_the_same(ray_processes, straight_run, tmp_path):
    run_dir = tmp_path / "faulted"
    staged_before = set(staging_dirs())
    codes = train_killing_a_worker(
        ray_processes, [*COMMON, "--output", str(tmp_path), "--experiment", "faulted"], run_dir
    )
    assert codes == [EXIT_OK]
    # The torn-down group's rank 0 died holding its staging dir; the new group's first checkpoint removed it.
    assert not set(staging_dirs()) - staged_before

    result = json.loads((run_dir / "result.json").read_text())
    resumed_from = result["last_metrics"]["resumed_from"]
    assert resumed_from > 0, "the worker group was never restarted from a checkpoint"
    assert summary_epochs(run_dir) == list(range(EPOCHS))  # each epoch once, none lost, none twice
    # CPU, same seed, same worker count: the recovered run ends with exactly the straight run's weights.
    assert_bitwise_equal(final_weights(run_dir), final_weights(straight_run))


def test_a_killed_driver_is_resumed_without_redoing_finished_epochs(ray_local, tmp_path):
    run_dir = tmp_path / "driver"
    cmd = [sys.executable, "-m", "raytrain_cls", "train", *COMMON, "--output", str(tmp_path), "--experiment", "driver"]
    # Its own session: SIGKILL to the group takes the driver and the local Ray it started down together, as a
    # lost head node would.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: (run_dir / "summary.csv").is_file() and len(summary_epochs(run_dir)) >= 2,
            180,
            "two finished epochs",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = summary_epochs(run_dir)
    # What a worker that dies within Ray's health-check interval of reporting leaves: a complete checkpoint
    # folder Ray never registered. The finished run must not keep it.
    orphan = run_dir / "epoch-0000-step-9999999"
    shutil.copytree(sorted(run_dir.glob("epoch-*"))[-1], orphan)

    assert main(["train", "--resume", str(run_dir)]) == EXIT_OK
    assert summary_epochs(run_dir) == list(range(EPOCHS))
    assert not orphan.exists() and (run_dir / f"epoch-{EPOCHS - 1:04d}").is_dir()
    result = json.loads((run_dir / "result.json").read_text())
    resumed_from = result["last_metrics"]["resumed_from"]
    # Resumed from a checkpoint at or after the end of the last epoch the first driver finished.
    assert resumed_from >= (max(done_before) + 1) * UPDATES_PER_EPOCH - 4, (resumed_from, done_before)


def test_ctrl_c_stops_the_run_and_says_how_to_continue_it(ray_local, tmp_path):
    """Ray's own SIGINT handler aborts the run and then sys.exit()s: before, the command ended with status 1 and
    not a word. Now it ends as a SIGINT'd command does (130), naming the --resume that continues the run."""
    run_dir = tmp_path / "ctrl-c"
    cmd = [sys.executable, "-m", "raytrain_cls", "train", *COMMON, "--output", str(tmp_path), "--experiment", "ctrl-c"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "summary.csv").is_file(), 180, "a finished epoch")
        proc.send_signal(signal.SIGINT)  # to the driver alone, as a terminal's Ctrl-C reaches the foreground job
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert f"raytrain-cls train --resume {run_dir}" in err
    assert list(run_dir.glob("epoch-*")), "no checkpoint kept to continue from"


def test_a_driver_killed_before_the_first_checkpoint_resumes_from_the_checkpoint_it_started_from(
    straight_run, tmp_path
):
    """A run started with --resume CHECKPOINT whose driver dies before the run writes a checkpoint of its own:
    `--resume RUN` continues from that checkpoint (not from scratch) and ends exactly as the straight run."""
    start = straight_run / f"epoch-{EPOCHS - 2:04d}"
    run_dir = tmp_path / "early"
    cmd = [
        sys.executable,
        "-m",
        "raytrain_cls",
        "train",
        *COMMON,
        "--resume",
        str(start),
        "--output",
        str(tmp_path),
        "--experiment",
        "early",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # config.yaml is written just before the fit: the driver dies before any worker trains a step
        wait_for(lambda: (run_dir / "config.yaml").is_file(), 180, "the run's config.yaml")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(run_dir.glob("epoch-*")), "the driver lived long enough to checkpoint"

    assert main(["train", "--resume", str(run_dir)]) == EXIT_OK
    assert summary_epochs(run_dir) == [EPOCHS - 1]  # only the epoch after the starting checkpoint
    result = json.loads((run_dir / "result.json").read_text())
    assert result["last_metrics"]["resumed_from"] == read_meta(start)["num_updates"]
    assert_bitwise_equal(final_weights(run_dir), final_weights(straight_run))


def test_a_mid_epoch_checkpoint_resumes_on_another_worker_count(straight_run, tmp_path):
    """Two workers stopped mid-epoch; one worker continues: the epoch still trains on every sample once."""
    ckpt = sorted(straight_run.glob("epoch-0002-step-*"))[0]
    position = read_meta(ckpt)["in_epoch"]
    assert position["epoch"] == 2 and position["world_size"] == 2
    code = main(
        [
            "train",
            *COMMON,
            "--epochs",
            "3",
            "--num-workers",
            "1",
            "--resume",
            str(ckpt),
            "--output",
            str(tmp_path),
            "--experiment",
            "one-worker",
        ]
    )
    assert code == EXIT_OK
    result = json.loads((tmp_path / "one-worker" / "result.json").read_text())
    last = result["last_metrics"]
    assert last["epoch"] == 2 and summary_epochs(tmp_path / "one-worker") == [2]
    consumed = position["samples"]
    # The samples already trained on by the two workers, plus the rest of the epoch's order on one worker
    # (full batches of 32 only): nothing repeated, nothing skipped.
    assert last["train_samples"] == consumed + 32 * ((1438 - consumed) // 32)


def summary_lrs(run_dir: Path) -> dict[int, float]:
    with (run_dir / "summary.csv").open() as f:
        return {int(row["epoch"]): float(row["lr"]) for row in csv.DictReader(f)}


def test_start_epoch_starts_a_new_run_there_with_the_schedule_stepped(straight_run, tmp_path):
    """timm's --start-epoch over a --resume checkpoint of an earlier epoch: the new run trains only the epochs
    from there on, at the LR the uninterrupted schedule has there."""
    import yaml

    lr = yaml.safe_load((straight_run / "config.yaml").read_text())["resolved"]["lr"]
    code = main(
        [
            "train",
            *COMMON,
            "--num-workers",
            "1",
            "--lr",
            repr(lr),
            "--start-epoch",
            str(EPOCHS - 1),
            "--resume",
            str(straight_run / "epoch-0001"),
            "--output",
            str(tmp_path),
            "--experiment",
            "late",
        ]
    )
    assert code == EXIT_OK
    assert summary_epochs(tmp_path / "late") == [EPOCHS - 1]
    assert summary_lrs(tmp_path / "late")[EPOCHS - 1] == pytest.approx(summary_lrs(straight_run)[EPOCHS - 1])
