"""A user's ImageFolder tree (timm's default dataset type) trains through --data-dir with timm's defaults."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from raytrain_cls.commands.cli import EXIT_OK, main

pytestmark = pytest.mark.integration
CLASSES = ["one", "seven", "zero"]  # folder names, deliberately not in digit order


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory):
    """train/<class>/*.png and val/<class>/*.png (timm finds 'val' when 'validation' is absent)."""
    root = tmp_path_factory.mktemp("pets")
    digits = load_digits()
    wanted = {"zero": 0, "one": 1, "seven": 7}
    for name, label in wanted.items():
        idx = np.flatnonzero(digits.target == label)
        for split, part in (("train", idx[:60]), ("val", idx[60:80])):
            d = root / split / name
            d.mkdir(parents=True)
            for i in part:
                img = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(img, "L").resize((24, 24)).save(d / f"{i}.png")
    return root


def test_imagefolder_run_uses_the_tree_classes(ray_local, folder_tree, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data-dir",
            str(folder_tree),
            "--model",
            "test_resnet",
            "--num-workers",
            "2",
            "--img-size",
            "32",
            "-b",
            "16",
            "-j",
            "0",
            "--output",
            str(tmp_path),
            "--experiment",
            "pets",
            "--progress",
            "bar",
            "--log-interval",
            "2",
            "--epochs",
            "3",
            "--val-interval",
            "2",
        ]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    run_dir = tmp_path / "pets"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["dataset"] == "" and cfg["model"]["model"] == "test_resnet"
    assert cfg["resolved"]["classes"] == sorted(CLASSES) and cfg["resolved"]["num_classes"] == 3
    assert cfg["resolved"]["train_samples"] == 180 and cfg["resolved"]["val_samples"] == 60
    # timm's rule with --lr unset: lr_base 0.1 x (16 x 2 workers) / 256
    assert cfg["resolved"]["lr"] == pytest.approx(0.1 * 32 / 256)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["last_metrics"]["epoch"] == 2 and result["last_metrics"]["eval_samples"] == 60
    # --val-interval 2 over 3 epochs: evaluated (and checkpointed) after epoch 1 and the last one, not epoch 0
    assert sorted(p.name for p in run_dir.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]
    assert [row["epoch"] for row in csv.DictReader((run_dir / "summary.csv").open())] == ["1", "2"]
    out = capsys.readouterr().out
    assert f"Run directory: {run_dir}" in out and "Best eval_top1" in out
    # --progress bar: the driver draws a redrawn bar per epoch and prints the epoch lines itself
    assert "\rEpoch 0/2 [" in out and "ETA" in out and " loss " in out
    assert "\r\x1b[KEpoch 0/2: train_loss" in out and "(not evaluated: --val-interval)" in out
    assert "\r\x1b[KEpoch 1/2: train_loss" in out and "top1" in out.split("Epoch 1/2: train_loss")[1]
    assert "Train: 0/2 [" not in out  # rank 0's plain step lines are replaced by the bar, not doubled
