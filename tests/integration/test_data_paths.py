"""Real Ray Train runs over the data paths of issues 4 and 8: bad images skipped and counted with the data held on
the device (and a DataLoader run failed past --max-bad-fraction), Parquet shards through the DataLoader path,
and the Ray Data path on 2 CPU workers with a CPU left free for Ray Data."""

import csv
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from raytrain_cls.commands.cli import EXIT_FAILED, EXIT_OK, main
from raytrain_cls.data.shards import Manifest, ShardWriter

pytestmark = pytest.mark.integration
CLASSES = ["one", "seven", "zero"]
WANTED = {"zero": 0, "one": 1, "seven": 7}


def digit_png(img8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((img8 * 255 / 16).astype(np.uint8), "L").resize((24, 24)).save(buf, format="PNG")
    return buf.getvalue()


def digit_samples():
    """(split, class, index, png bytes): 60 training and 20 validation digits per class."""
    digits = load_digits()
    for name, label in WANTED.items():
        idx = np.flatnonzero(digits.target == label)
        for split, part in (("train", idx[:60]), ("validation", idx[60:80])):
            for i in part:
                yield split, name, int(i), digit_png(digits.images[i])


BAD = {
    "truncated.png": lambda good: good[: len(good) // 2],
    "empty.png": lambda good: b"",
    "notes.png": lambda good: b"plain text\n",
}


@pytest.fixture(scope="module")
def tree_with_bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-tree")
    good = None
    for split, name, i, data in digit_samples():
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(data)
        good = data
    for fname, make in BAD.items():  # 3 of 183 training files: 1.6 %, above the default 1 % limit
        (root / "train" / "seven" / fname).write_bytes(make(good))
    return root


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """The same digits as Parquet shards of 50 rows, written with the shard writer `prepare` uses."""
    root = tmp_path_factory.mktemp("shards")
    writers = {split: ShardWriter(str(root), split, shard_size=50, num_classes=3) for split in ("train", "validation")}
    for split, name, i, data in digit_samples():
        writers[split].add(data, CLASSES.index(name), f"{split}/{name}/{i}.png")
    splits = {split: w.close() for split, w in writers.items()}
    (root / "manifest.json").write_text(Manifest(CLASSES, splits).to_json())
    return root


def run(tmp_path, name, *args):
    # The digits recipe's mild augmentation: 15 steps are enough to leave chance (33 %) far behind.
    return main(
        [
            "train",
            "--num-workers",
            "2",
            "--model",
            "resnet10t",
            "--img-size",
            "32",
            "--crop-pct",
            "1",
            "-b",
            "16",
            "-j",
            "0",
            "--scale",
            "0.6",
            "1",
            "--hflip",
            "0",
            "--color-jitter",
            "0",
            "--opt",
            "sgd",
            "--lr",
            "0.1",
            "--warmup-epochs",
            "0",
            "--output",
            str(tmp_path),
            "--experiment",
            name,
            *args,
        ]
    )


def test_bad_images_are_skipped_counted_and_logged_with_the_data_on_the_device(
    ray_local, tree_with_bad_files, tmp_path, capsys
):
    """--data-on-device on 2 workers: decoded once per worker, gathered and augmented on the (CPU) device, no
    loader processes; the bad files found at load are skipped, counted and logged with their paths whenever the
    sampler deals them, as on the DataLoader path (whose real-run count is the next test's failure)."""
    code = run(
        tmp_path,
        "bad",
        "--data-dir",
        str(tree_with_bad_files),
        "--epochs",
        "4",
        "--data-on-device",
        "--max-bad-fraction",
        "0.05",
        "--lr",
        "0.05",
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "Data on the device: 210 images" in captured.out  # 180 readable training images + a 30-image val share
    with (tmp_path / "bad" / "summary.csv").open() as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    result = json.loads((tmp_path / "bad" / "result.json").read_text())
    metrics = result["last_metrics"]
    # 183 training files dealt as 5 full batches of 16 per worker (160 samples): the bad ones among them counted.
    assert 0 < metrics["train_bad_samples"] <= 3 and metrics["eval_bad_samples"] == 0
    assert metrics["eval_samples"] == 60
    assert "unreadable training image(s) in epoch" in captured.out
    assert any(n in captured.out for n in BAD)
    # 3 classes: chance is 33 %. 20 steps of batch 16 reach 58 % here, exactly as --gpu-decode does (same batches);
    # the eval accuracy of so short a run swings with its BatchNorm statistics, on the DataLoader path too.
    assert result["best_value"] > 50.0


def test_too_many_bad_images_fail_the_run_with_examples(ray_local, tree_with_bad_files, tmp_path, capsys):
    code = run(
        tmp_path,
        "too-bad",
        "--data-dir",
        str(tree_with_bad_files),
        "--epochs",
        "1",
        "--seed",
        "3",
        "--max-bad-fraction",
        "0.001",
    )
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert "could not be read, more than --max-bad-fraction 0.001" in err
    assert "seven/" in err and any(n in err for n in BAD)


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory):
    """`raytrain-cls prepare digits DST`: the bundled default data set as Parquet shards of 500 rows."""
    dst = tmp_path_factory.mktemp("prepared") / "digits"
    assert main(["prepare", "digits", str(dst), "--shard-size", "500", "-j", "0"]) == EXIT_OK
    return dst


def recipe_run(tmp_path, name, data_dir, *args, epochs=3):
    """The digits recipe (the default job) for a few of its 10 epochs, on Parquet shards."""
    return main(
        [
            "train",
            "-c",
            "digits",
            "--dataset",
            "parquet",
            "--data-dir",
            str(data_dir),
            "--epochs",
            str(epochs),
            "--warmup-epochs",
            "0",
            "--output",
            str(tmp_path),
            "--experiment",
            name,
            *args,
        ]
    )


def test_prepared_shards_train_through_the_dataloader_path(ray_local, prepared_digits, tmp_path, capsys):
    code = recipe_run(tmp_path, "pq", prepared_digits, "--shuffle-window", "2")
    assert code == EXIT_OK, capsys.readouterr().err
    run_dir = tmp_path / "pq"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["resolved"]["classes"] == [str(i) for i in range(10)]
    assert (cfg["resolved"]["train_samples"], cfg["resolved"]["val_samples"]) == (1438, 359)
    metrics = json.loads((run_dir / "result.json").read_text())["last_metrics"]
    assert metrics["eval_samples"] == 359 and metrics["eval_top1"] > 90.0  # the in-memory digits reach ~97 here


def test_ray_data_path_trains_with_a_cpu_left_free(ray_local, prepared_digits, tmp_path, capsys):
    code = recipe_run(
        tmp_path,
        "raydata",
        prepared_digits,
        "--loader",
        "ray",
        "--num-workers",
        "2",
        "--resources-per-worker",
        "CPU=0.5",
    )  # 3 epochs: Ray Data's order is not seeded, 2 vary
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    metrics = json.loads((tmp_path / "raydata" / "result.json").read_text())["last_metrics"]
    # streaming_split(equal=True): 719 rows per worker -> 22 batches of 32 per worker, 1408 samples an epoch.
    assert metrics["train_samples"] == 1408 and metrics["updates_per_epoch"] == 22
    assert metrics["eval_samples"] == 359 and metrics["eval_top1"] > 90.0


def test_shards_on_s3_train_with_device_decode_into_a_run_on_s3_that_resumes(
    ray_local, digit_shards, s3_upload, tmp_path, capsys
):
    """Training workers (other processes) read the shards from an s3:// URI (a local moto S3 server) and decode
    them with the --gpu-decode path, here on their CPU device; the run itself lives on S3 too, as on a multi-node
    cluster, and `--resume` of it from there continues with its own config.yaml."""
    from raytrain_cls.core.storage import join, read_text

    uri = s3_upload(digit_shards, "integration/digit-shards")
    output = uri.replace("/digit-shards?", "/runs?")
    run_dir = join(output, "s3")
    code = run(
        tmp_path, "s3", "--dataset", "parquet", "--data-dir", uri, "--epochs", "1", "--gpu-decode", "--output", output
    )
    assert code == EXIT_OK, capsys.readouterr().err
    cfg = yaml.safe_load(read_text(join(run_dir, "config.yaml")))
    assert cfg["data"]["data_dir"] == uri and cfg["resolved"]["train_samples"] == 180
    assert cfg["data"]["gpu_decode"] is True
    assert json.loads(read_text(join(run_dir, "result.json")))["last_metrics"]["eval_samples"] == 60

    assert main(["train", "--resume", run_dir, "--epochs", "2"]) == EXIT_OK, capsys.readouterr().err
    result = json.loads(read_text(join(run_dir, "result.json")))
    assert result["last_metrics"]["epoch"] == 1 and result["last_metrics"]["resumed_from"] > 0
    assert [row.split(",")[0] for row in read_text(join(run_dir, "summary.csv")).splitlines()[1:]] == ["0", "1"]
    assert yaml.safe_load(read_text(join(run_dir, "config.yaml")))["data"]["data_dir"] == uri  # its own config
    assert result["best_checkpoint"].startswith("s3://") and result["run_dir"] == run_dir
    assert main(["eval", result["best_checkpoint"], "-j", "0"]) == EXIT_OK  # fetched from S3 and evaluated
    assert "60 images" in capsys.readouterr().out


def test_ray_data_path_without_a_free_cpu_is_refused_before_training(ray_local, digit_shards, tmp_path, capsys):
    code = run(
        tmp_path,
        "raydata-full",
        "--dataset",
        "parquet",
        "--data-dir",
        str(digit_shards),
        "--loader",
        "ray",
        "--num-workers",
        "2",
    )
    err = capsys.readouterr().err
    assert code == 2 and "Ray Data needs at least one CPU" in err
    assert not (tmp_path / "raydata-full" / "result.json").exists()
