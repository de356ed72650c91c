"""Ray Tune searches on the shared local Ray: ASHA stopping bad trials, best.yaml closing the loop, and an
interrupted search resumed without rerunning finished trials."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrain_cls.commands.cli import EXIT_OK, main
from raytrain_cls.core.config import load_config
from raytrain_cls.core.storage import exists, join, read_text
from raytrain_cls.run.checkpointer import staging_dirs

pytestmark = pytest.mark.integration
TINY = ["--model", "test_resnet", "--warmup-epochs", "0", "--log-interval", "1000", "--checkpoint-hist", "1"]


def trials(search_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read_text(join(search_dir, "trials.csv")))))


def size(uri: str) -> int:
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(uri)
    return filesystem.get_file_info(inner).size


def four_trials(output: str, experiment: str, *options: str) -> list[str]:
    """4 one-worker trials, two at a time on the 2 CPUs, two good LRs and two hopeless ones: ASHA (the default)
    must stop a hopeless one (the last at the latest: by its first rung two trials, one good, have recorded theirs)."""
    grid = "lr=grid:0.1,0.0000005,0.05,0.0000001"
    return ["tune", *TINY, "--epochs", "4", "--search", grid, "--num-samples", "1", "--max-concurrent-trials", "2",
            *options, "--output", output, "--experiment", experiment]  # fmt: skip


@pytest.fixture(scope="module")
def asha_search(ray_local, s3_upload, tmp_path_factory):
    """The four trials, each a Ray Train run, their search directory on S3 (a local moto server), as a multi-node
    search keeps it."""
    out = s3_upload(tmp_path_factory.mktemp("empty"), "integration/tune")
    asha = ["--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2"]
    staged_before = set(staging_dirs())
    code = main(four_trials(out, "asha", *asha))
    return code, join(out, "asha"), set(staging_dirs()) - staged_before


def test_asha_search_stops_bad_trials_early(asha_search, ray_processes):
    code, search_dir, staging_left = asha_search
    assert code == EXIT_OK
    rows = trials(search_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "stopped"}
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, rows
    assert all(int(r["epochs"]) < 4 for r in stopped)
    assert all(float(r["startup_s"]) > 0 for r in rows)  # each trial's process taking it to its first step
    assert float(rows[0]["lr"]) in (0.1, 0.05)  # sorted best first
    assert size(join(search_dir, "trials.png")) > 10_000
    for r in rows:  # every trial is a full training run with its own run directory
        run_dir = join(join(search_dir, "trials"), f"trial-{r['trial_id']}")
        assert exists(join(run_dir, "summary.csv")) and exists(join(run_dir, "config.yaml"))
    # The shared Ray has no dashboard: Ray Train's placement-group cleaner could never tell that a stopped trial's
    # controller died and would live on, logging every second (ray_trainer.py); the runs go without it.
    assert not ray_processes("ray::PlacementGroupCleaner")
    # A stopped trial's workers are killed while they wait in a report: none leaves its checkpoint's staging dir.
    assert not staging_left


@pytest.fixture(scope="module")
def in_process_search(ray_local, tmp_path_factory):
    """The four trials, each trained in Tune's own trial process, which Tune hands on to the next trial."""
    out = tmp_path_factory.mktemp("in-process")
    return main(four_trials(str(out), "in-process", "--in-process")), out / "in-process"


def test_in_process_trials_stop_early_and_hand_their_process_on(in_process_search):
    code, search_dir = in_process_search
    assert code == EXIT_OK
    rows = trials(search_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "stopped"}
    assert any(r["status"] == "stopped" and int(r["epochs"]) < 4 for r in rows), rows
    assert float(rows[0]["lr"]) in (0.1, 0.05) and rows[0]["status"] == "completed"
    first_phases = []
    for r in rows:  # each trial a full run directory, as a Ray Train trial leaves it
        run_dir = search_dir / "trials" / f"trial-{r['trial_id']}"
        assert (run_dir / "config.yaml").is_file()
        with (run_dir / "summary.csv").open() as f:
            assert [int(x["epoch"]) for x in csv.DictReader(f)] == list(range(int(r["epochs"])))
        result = json.loads((run_dir / "result.json").read_text())
        assert result["last_metrics"]["epoch"] == int(r["epochs"]) - 1
        assert Path(r["checkpoint"], "meta.json").is_file() and r["checkpoint"].startswith(str(run_dir))
        assert float(r["startup_s"]) > 0
        first_phases.append(result["startup"]["phases"][0][0])
    # The first trial in each of the two processes paid their imports; a later trial took a process with them done.
    assert first_phases.count("trial process imports (torch, timm, raytrain_cls)") < len(rows), first_phases


def test_a_killed_in_process_trial_resumes_from_its_newest_checkpoint(ray_local, ray_processes, tmp_path):
    """--max-failures 1: Tune starts the trial again in a new process, which continues from the run directory."""
    cmd = [sys.executable, "-m", "raytrain_cls", "tune", *TINY, "--epochs", "4", "--search", "lr=grid:0.1",
           "--num-samples", "1", "--scheduler", "fifo", "--in-process", "--max-failures", "1",
           "--output", str(tmp_path), "--experiment", "killed"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("killed/trials/trial-*/epoch-0000/meta.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.1)
        trial_processes = ray_processes("ray::ImplicitFunc")  # Tune names a function trial's actor so
        assert len(trial_processes) == 1, trial_processes
        os.kill(trial_processes[0], signal.SIGKILL)  # the trial's process, which our test cluster started
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = trials(tmp_path / "killed")
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", "4")]
    run_dir = tmp_path / "killed" / "trials" / f"trial-{rows[0]['trial_id']}"
    with (run_dir / "summary.csv").open() as f:
        assert [int(x["epoch"]) for x in csv.DictReader(f)] == [0, 1, 2, 3]
    resumed_from = json.loads((run_dir / "result.json").read_text())["last_metrics"]["resumed_from"]
    assert resumed_from > 0  # the update count of the checkpoint it continued from: not a fresh start (-1)


def test_an_in_process_trial_trains_exactly_what_a_ray_train_trial_does(asha_search, in_process_search):
    """Same loop, seeds and threads: the same LR gives the same curve either way, to the last digit, for every
    epoch both searches trained it."""
    curves = []
    for search_dir in (asha_search[1], in_process_search[1]):
        row = next(r for r in trials(str(search_dir)) if float(r["lr"]) == 0.1)
        run_dir = join(join(str(search_dir), "trials"), f"trial-{row['trial_id']}")
        summary = csv.DictReader(io.StringIO(read_text(join(run_dir, "summary.csv"))))
        curves.append([(r["train_loss"], r["eval_loss"], r["eval_top1"]) for r in summary])
    both = min(len(c) for c in curves)
    assert both >= 1 and curves[0][:both] == curves[1][:both]


def test_best_yaml_closes_the_loop(asha_search, tmp_path):
    search_dir = asha_search[1]
    best = trials(search_dir)[0]
    cfg = load_config(join(search_dir, "best.yaml"))
    assert cfg.optim.lr == float(best["lr"])
    assert best["checkpoint"].startswith("s3://") and exists(join(best["checkpoint"], "meta.json"))
    code = main(
        [
            "train",
            "-c",
            join(search_dir, "best.yaml"),
            "--epochs",
            "1",
            "--initial-checkpoint",
            best["checkpoint"],
            "--output",
            str(tmp_path),
            "--experiment",
            "from-best",
        ]
    )
    assert code == EXIT_OK
    assert (tmp_path / "from-best" / "result.json").is_file()


def finished_results(trials_dir) -> dict:
    """Each trial run's result.json that says it trained both epochs -> its mtime. An in-process trial writes its
    result.json with every epoch; a Ray Train trial's driver once, at the end."""
    finished = {}
    for path in trials_dir.glob("trial-*/result.json"):
        try:
            if json.loads(path.read_text())["last_metrics"]["epoch"] == 1:
                finished[path.parent.name] = path.stat().st_mtime_ns
        except (OSError, ValueError, KeyError):
            pass  # replaced (atomically) while read
    return finished


@pytest.mark.parametrize("trials_in", ["ray-train", "in-process"])
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_local, tmp_path, trials_in):
    search_dir = tmp_path / "resumable"
    cmd = [
        sys.executable,
        "-m",
        "raytrain_cls",
        "tune",
        *TINY,
        "--epochs",
        "2",
        "--search",
        "lr=grid:0.1,0.05",
        # A key the checks before Ray read (the model's arguments): each trial runs its own checks (run/trial.py),
        # as the lr-only searches above, which take their search's facts, do not.
        "--search",
        "drop=grid:0.0",
        "--num-samples",
        "1",
        "--max-concurrent-trials",
        "1",
        "--scheduler",
        "fifo",
        "--output",
        str(tmp_path),
        "--experiment",
        "resumable",
        *(["--in-process"] if trials_in == "in-process" else []),
    ]
    # The search driver joins the shared cluster (one Ray per host: Train's placement-group cleaner needs that).
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials_dir = search_dir / "trials"
    try:
        deadline = time.monotonic() + 300
        while not (finished_results(trials_dir) and len(list(trials_dir.glob("trial-*"))) >= 2):
            assert proc.poll() is None, "the search ended before it could be interrupted"
            assert time.monotonic() < deadline, "no finished trial after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; the cluster (and its storage) survive
        proc.wait()
    finished = finished_results(trials_dir)
    time.sleep(3)  # let the cluster reap the dead driver's trial actors

    assert main(["tune", "--resume", str(search_dir)]) == EXIT_OK
    rows = trials(search_dir)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    for name, mtime in finished.items():  # a finished trial's run was not redone
        assert (trials_dir / name / "result.json").stat().st_mtime_ns == mtime
    for r in rows:
        with (trials_dir / f"trial-{r['trial_id']}" / "summary.csv").open() as f:
            assert [int(x["epoch"]) for x in csv.DictReader(f)] == [0, 1]
