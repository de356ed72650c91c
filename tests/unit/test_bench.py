"""raytrain-cls bench: the GPU-check runner works end to end on the CPU device (so a GPU session only has to
run it), records every step as a JSON line as soon as it exists, and keeps going past a failing step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain_cls.entry import main


def test_gpu_checks_on_cpu_writes_a_line_per_step(tmp_path, capsys):
    code = main(
        [
            "bench",
            "gpu-checks",
            str(tmp_path),
            "--device",
            "cpu",
            "--images",
            "24",
            "--size",
            "96x80",
            "-b",
            "8",
            "-j",
            "0",
            "--model",
            "test_resnet",
            "--only",
            "decode,loader",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 0, rows
    assert [r["step"] for r in rows] == ["environment", "decode", "data", "loader-torch", "loader-gpu"]
    assert all(r["ok"] for r in rows)
    assert rows[1]["device_decode_augment_img_s"] > 0 and rows[3]["img_per_sec"] > 0 and rows[4]["img_per_sec"] > 0
    assert rows[2]["train"] == 24
    # the data went to a temporary folder, now removed: on a GPU machine everything under OUT is shipped back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-checks.jsonl"]
    assert not Path(rows[2]["shards"]).exists()


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path, capsys):
    code = main(
        [
            "bench",
            "gpu-checks",
            str(tmp_path),
            "--device",
            "cpu",
            "--images",
            "16",
            "--size",
            "96x80",
            "-b",
            "8",
            "-j",
            "0",
            "--model",
            "no_such_model",
            "--only",
            "loader",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 1
    assert [(r["step"], r["ok"]) for r in rows] == [
        ("environment", True),
        ("data", True),
        ("loader-torch", False),
        ("loader-gpu", False),
    ]
    assert "no_such_model" in rows[2]["error"]


def test_the_loader_bench_runs_past_the_end_of_an_epoch(tmp_path, capsys):
    # 24 images at -b 8 are 3 batches an epoch, less than the warm-up of 1 + 2 x 2 loader processes' prefetch:
    # the GPU command (4,096 images, -b 256, -j 16) is in the same position.
    code = main(
        [
            "bench",
            "gpu-checks",
            str(tmp_path),
            "--device",
            "cpu",
            "--images",
            "24",
            "--size",
            "64x48",
            "-b",
            "8",
            "-j",
            "2",
            "--model",
            "test_resnet",
            "--only",
            "loader",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 0, rows
    assert [r["step"] for r in rows] == ["environment", "data", "loader-torch", "loader-gpu"]
    assert all(r["images"] >= 16 for r in rows[2:])
    err = capsys.readouterr().err.splitlines()  # and a table for people, after the JSON lines on stdout
    table = err[err.index("bench gpu-checks") :]
    assert table[1].split()[:3] == ["step", "ok", "img_per_sec"]
    assert [line.split()[0] for line in table[2:]] == ["environment", "data", "loader-torch", "loader-gpu"]


def test_the_train_step_times_the_second_of_two_epochs_of_at_least_train_steps(tmp_path, monkeypatch, capsys):
    import raytrain_cls.bench.common as bench_common

    seen = []

    def fake_train(cfg, echo=print):
        seen.append((cfg.sched.epochs, cfg.data.epoch_repeats, cfg.data.gpu_decode))
        return {
            "last_metrics": {
                "epoch": cfg.sched.epochs - 1,
                "img_per_sec": 123.4,
                "train_samples": 80,
                "train_time": 0.65,
            }
        }

    monkeypatch.setattr(bench_common, "train", fake_train)  # as the run driver would be called
    code = main(
        [
            "bench",
            "gpu-checks",
            str(tmp_path),
            "--device",
            "cpu",
            "--images",
            "24",
            "--size",
            "64x48",
            "-b",
            "8",
            "-j",
            "0",
            "--model",
            "test_resnet",
            "--only",
            "train",
            "--train-steps",
            "10",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 0, rows
    # 10 steps x 8 images = 80 images an epoch: 80 / 24 passes over the data
    assert seen == [(2, pytest.approx(80 / 24, rel=1e-3), False), (2, pytest.approx(80 / 24, rel=1e-3), True)]
    assert [(r["step"], r["img_per_sec"], r["epochs"]) for r in rows[2:]] == [
        ("train-torch", 123.4, 2),
        ("train-gpu", 123.4, 2),
    ]


def test_the_step_bench_hosts_the_same_model_on_device_data_for_two_long_epochs():
    """What the hosted side of `bench step` runs: the user's model flags, the synthetic set held on the device
    without augmentation, epochs of at least --steps steps, one worker."""
    from raytrain_cls.bench.step import step_config

    cfg = step_config(["--model", "resnet10t", "-b", "8", "--channels-last"], steps=40, compiled=False)
    assert (cfg.model.model, cfg.data.batch_size, cfg.model.channels_last) == ("resnet10t", 8, True)
    assert cfg.data.dataset == "synthetic" and cfg.data.data_on_device and cfg.aug.no_aug
    assert cfg.data.synthetic_samples == 8 * 16 and cfg.data.epoch_repeats * 16 >= 40
    assert cfg.scaling.num_workers == 1 and not cfg.model.torchcompile
    assert step_config(["--model", "resnet10t"], steps=4, compiled=True).model.torchcompile == "inductor"


def test_the_bare_loop_trains_the_configured_model_and_times_its_steps():
    import torch

    from raytrain_cls.bench.step import bare_loop, step_config

    cfg = step_config(
        ["--model", "test_resnet", "-b", "4", "--img-size", "32", "--num-classes", "3"], steps=3, compiled=False
    )
    result = bare_loop(cfg, torch.device("cpu"), steps=3, warmup=1)
    assert result["steps"] == 3 and result["img_per_sec"] > 0 and result["seconds"] > 0


def test_time_to_accuracy_clocks_each_epoch_from_command_start_and_first_step(tmp_path):
    from raytrain_cls.bench.tta import EpochClock, time_to_accuracy

    clock = EpochClock(str(tmp_path / "tta.jsonl"), "eval_top1")
    clock.after_report(None, [{"epoch": 0, "eval_top1": 80.0}, {"epoch": 0, "eval_top1": 79.0}], None)
    clock.after_report(None, [{"epoch": 0, "step": 9, "recovery": 1, "eval_top1": -1e9}], None)  # not an epoch
    clock.after_report(None, [{"epoch": 1, "eval_top1": 93.6}], None)
    rows = [json.loads(line) for line in (tmp_path / "tta.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["value"]) for r in rows] == [(0, 80.0), (1, 93.6)]  # rank 0's, epochs only
    rows[0]["at"], rows[1]["at"] = 130.0, 140.5
    result = time_to_accuracy(rows, start=100.0, first_step=120.0, target=93.5)
    assert result["epochs"][1] == dict(epoch=1, top1=93.6, s_from_start=40.5, s_from_first_step=20.5)
    assert result["reached"]["epoch"] == 1
    assert time_to_accuracy(rows, 100.0, None, target=99.0)["reached"] is None


def test_gpu_checks_run_issue_8s_step_pair_and_time_to_accuracy_on_request(tmp_path, monkeypatch, capsys):
    """--only step,tta: the step pair gets the model and GPU flags, the tta run the recipe, the Fashion-MNIST
    folder and a run directory under the work folder; each result is one line."""
    import raytrain_cls.bench.step as bench_step
    import raytrain_cls.bench.tta as bench_tta

    calls = {}

    def fake_measure(flags, device, steps, warmup, compiled):
        calls["step"] = (flags, device, steps, compiled)
        return [{"img_per_sec": 100.0}, {"img_per_sec": 99.0, "ratio_to_bare": 0.99}]

    def fake_tta(recipe, overrides, target):
        calls["tta"] = (recipe, overrides, target)
        return {"reached": {"epoch": 9, "s_from_first_step": 18.0}}

    monkeypatch.setattr(bench_step, "measure", fake_measure)
    monkeypatch.setattr(bench_tta, "run_command", fake_tta)
    code = main(
        [
            "bench",
            "gpu-checks",
            str(tmp_path),
            "--device",
            "cpu",
            "-b",
            "64",
            "--model",
            "resnet50",
            "--only",
            "step,tta",
            "--fm-dir",
            "/data/fm",
            "--tta-flags",
            "--epochs 2",
            "--train-steps",
            "30",
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "gpu-checks.jsonl").read_text().splitlines()]
    assert code == 0, rows
    assert [r["step"] for r in rows] == ["environment", "step-eager", "tta"]
    assert rows[1]["ratio"] == 0.99 and rows[2]["reached"]["epoch"] == 9
    assert calls["step"] == (["--model", "resnet50", "-b", "64"], "cpu", 30, False)  # no AMP flags on a CPU
    recipe, overrides, target = calls["tta"]
    assert recipe.endswith("jobs/fashion_mnist_fast.yaml") and Path(recipe).is_file() and target == 93.5
    assert overrides == [
        "--data-dir",
        "/data/fm",
        "--output",
        str(tmp_path / "work" / "runs"),
        "--experiment",
        "tta",
        "--no-use-gpu",
        "--epochs",
        "2",
    ]
    with pytest.raises(SystemExit, match="unknown checks"):
        main(["bench", "gpu-checks", str(tmp_path), "--only", "step,warp"])


def test_the_issue_names_data_and_e2e_run_the_loader_and_train_benches():
    from raytrain_cls.bench.cli import parse_args

    assert parse_args(["data", "--dataset", "digits"]).what == "loader"
    assert parse_args(["e2e", "--paths", "torch"]).what == "train"
    assert parse_args(["loader"]).what == "loader"


def test_a_table_aligns_the_columns_rows_have_and_leaves_the_rest_out():
    from raytrain_cls.bench.common import table

    text = table(
        "bench x",
        [dict(path="torch", img_per_sec=641.5123, bad=0), dict(path="gpu", img_per_sec=12345.6)],
        ("path", "img_per_sec", "bad", "never"),
    )
    assert text.splitlines() == ["bench x", "path   img_per_sec  bad", "torch  641.5        0", "gpu    12346"]


def test_the_startup_benchs_bare_script_reaches_its_first_step_without_ray():
    """bench startup's bare side: the job's first step in a plain process, timed from that process's start."""
    from raytrain_cls.bench.startup import _bare

    row = _bare(["--model", "test_resnet", "-b", "16"])
    assert row["path"] == "bare" and 0 < row["imports_s"] < row["first_step_s"] < 120


def test_checkpoint_bench_prints_the_cost_of_checksums(capsys):
    assert main(["bench", "checkpoint", "--model", "test_resnet", "--num-classes", "4", "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["bench"] == "checkpoint" and row["hash_s"] <= row["save_s"] and row["verify_s"] > 0


def test_the_trials_bench_searches_distinct_trainable_lrs():
    from raytrain_cls.bench.trials import lr_grid

    grid = lr_grid(4)
    lrs = [float(v) for v in grid.removeprefix("lr=grid:").split(",")]
    assert grid.startswith("lr=grid:") and len(set(lrs)) == 4 and min(lrs) == 0.01 and max(lrs) == 0.1


def test_the_trials_bench_reads_each_trials_start_and_the_gap_since_the_one_before(tmp_path):
    """From the search directory: trials in the order they ran, the gap from one's result.json to the next's first
    step (a trial's stamps are wall-clock times, the result file's time is when it was written)."""
    import os

    from raytrain_cls.bench.trials import trial_figures

    rows = [("b", 0.3, 1000.0, 1002.0), ("a", 4.0, 990.0, 999.5)]  # trial, startup_s, first step, result written
    (tmp_path / "trials.csv").write_text(
        "trial_id,status,lr,startup_s\n" + "".join(f"{t},completed,0.1,{s}\n" for t, s, _, _ in rows)
    )
    for trial, _, first_step, written in rows:
        result = tmp_path / "trials" / f"trial-{trial}" / "result.json"
        result.parent.mkdir(parents=True)
        result.write_text(json.dumps({"last_metrics": {"startup": {"first_step": first_step}}}))
        os.utime(result, (written, written))
    figures = trial_figures(tmp_path)
    assert [f["startup_s"] for f in figures] == [4.0, 0.3]  # "a" ran first
    assert "gap_s" not in figures[0] and figures[1]["gap_s"] == 0.5


def test_make_data_writes_the_same_tree_with_any_number_of_processes(tmp_path, capsys):
    # one process per CPU made the 4,505 JPEGs of the first GPU session's gpu-checks in 262 s on one core;
    # each picture is seeded by its index so that splitting them among processes changes no file
    from raytrain_cls.bench.common import make_data

    make_data(str(tmp_path / "one"), 12, (64, 48), classes=3, workers=1)
    make_data(str(tmp_path / "two"), 12, (64, 48), classes=3, workers=2)
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.jpg")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.jpg")}
    assert len(one) == 12 + 3 and one == two
    assert sum(1 for p in one if p.parts[0] == "validation") == 3
    assert {p.parts[1] for p in one} == {"class_000", "class_001", "class_002"}


def test_the_decode_bench_profiles_an_augment_batch_where_its_time_goes():
    # the first GPU session found decode + augment at 2.0x the CPU pipeline against a 3x target, with no profile
    import torch

    from raytrain_cls.bench.decode import profile_augment, synthesize_jpegs

    result = profile_augment(synthesize_jpegs(8, 96, 80, 90, unique=2), 64, 8, torch.device("cpu"), top=5)
    assert result["profile_batch"] == 8 and result["profile_draws_ms"] > 0
    assert len(result["profile_top"]) == 5
    name, calls, device_ms, host_ms = result["profile_top"][0]
    assert isinstance(name, str) and calls >= 1 and device_ms == 0 and host_ms > 0
    host = [row[3] for row in result["profile_top"]]
    assert host == sorted(host, reverse=True)  # the costliest op first


def test_the_resize_bench_trains_the_fixed_size_run_unless_told_not_to(tmp_path, monkeypatch, capsys):
    """The e2e test runs `bench resize --no-fixed-run` (it checks the elastic run against timm's scheduler); a user
    gets the fixed-size run beside the elastic one by default, and both runs' epochs in the table."""
    from raytrain_cls.bench import resize

    calls = []

    class Cluster:
        def __init__(self, port, worker_base):
            self.env = {}

        def start(self):
            calls.append("start")

        def stop(self):
            calls.append("stop")

    monkeypatch.setattr(resize, "LocalCluster", Cluster)
    monkeypatch.setattr(resize, "elastic_run", lambda *a: calls.append("elastic") or dict(grow_s=1.0, shrink_s=2.0))
    monkeypatch.setattr(resize, "fixed_run", lambda *a: calls.append("fixed"))
    monkeypatch.setattr(resize, "epochs_of", lambda run_dir, name: [dict(run=name, epoch=0)])
    assert main(["bench", "resize", "--output", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    assert calls == ["start", "elastic", "fixed", "stop"]
    assert [e["run"] for e in json.loads((tmp_path / "a.json").read_text())["epochs"]] == ["elastic", "fixed"]
    calls.clear()
    argv = ["bench", "resize", "--no-fixed-run", "--output", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert calls == ["start", "elastic", "stop"]
    assert [e["run"] for e in json.loads((tmp_path / "b.json").read_text())["epochs"]] == ["elastic"]
