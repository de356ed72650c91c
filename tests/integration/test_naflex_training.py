"""timm's --naflex-loader on 2 gloo workers, reading a Hugging Face data set (--dataset hfds/...): variable-resolution
patch batches train a NaFlexVit, a worker killed mid-epoch is replaced from a recovery checkpoint, and
`raytrain-cls eval` reproduces the run's validation (predict runs too). One Ray run for both features keeps the suite
short."""

import csv
import json

import pytest
import yaml
from PIL import Image
from test_recovery import summary_epochs, train_killing_a_worker

from raytrain_cls.commands.cli import EXIT_OK
from raytrain_cls.commands.inference import evaluate_checkpoint, predict
from raytrain_cls.data.sources import load_digits_source

pytestmark = pytest.mark.integration

EPOCHS = 6
CLASSES = [f"digit-{i}" for i in range(10)]
# A 4-block NaFlexVit with 4x4-pixel patches: digits (8x8) resized to 4, 16 or 36 patches per training batch.
NAFLEX = [
    "--num-workers",
    "2",
    "--model",
    "naflexvit_base_patch16_gap",
    "--model-kwargs",
    "depth=4",
    "embed_dim=64",
    "num_heads=4",
    "patch_size=4",
    "class_token=True",
    "global_pool=token",
    "--in-chans",
    "1",
    "--naflex-loader",
    "--naflex-train-seq-lens",
    "4",
    "16",
    "36",
    "--naflex-max-seq-len",
    "16",
    "-b",
    "8",
    "--mixup",
    "0.1",
    "--mixup-prob",
    "0.5",
    "--opt",
    "adamw",
    "--lr",
    "3e-3",
    "--weight-decay",
    "0.05",
    "--warmup-epochs",
    "0",
    "--epochs",
    str(EPOCHS),
    "--recovery-interval",
    "4",
    "--max-failures",
    "1",
    "--log-interval",
    "100",
]


def save_digits_as_hf_dataset(path) -> str:
    """The bundled digits source (the same 1438 training / 359 validation images) as a saved Hugging Face data set
    with its own column names, as `datasets` users keep their data."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(picture=datasets.Image(), digit=datasets.ClassLabel(names=CLASSES))

    def split(images):
        return datasets.Dataset.from_dict(
            dict(picture=[Image.fromarray(img, "L") for img in images.images], digit=images.targets.tolist()),
            features=features,
        )

    digits = load_digits_source()
    datasets.DatasetDict(train=split(digits.train), validation=split(digits.val)).save_to_disk(str(path))
    return str(path)


def test_naflex_run_on_a_hf_dataset_learns_and_survives_a_killed_worker(ray_processes, tmp_path):
    data = save_digits_as_hf_dataset(tmp_path / "hf-digits")
    run_dir = tmp_path / "naflex"
    args = [
        "-c",
        "digits",
        "--dataset",
        f"hfds/{data}",
        "--input-key",
        "picture",
        "--target-key",
        "digit",
        *NAFLEX,
        "--output",
        str(tmp_path),
        "--experiment",
        "naflex",
    ]
    codes = train_killing_a_worker(ray_processes, args, run_dir, timeout=180)
    assert codes == [EXIT_OK]

    result = json.loads((run_dir / "result.json").read_text())
    last = result["last_metrics"]
    assert last["resumed_from"] > 0, "the worker group was never restarted from a checkpoint"
    assert summary_epochs(run_dir) == list(range(EPOCHS))
    # 1438 training images on 2 ranks: every epoch, the interrupted one included, trains on each exactly once
    assert last["train_samples"] == 1438
    with (run_dir / "summary.csv").open() as f:
        top1 = [float(r["eval_top1"]) for r in csv.DictReader(f)]
    assert top1[-1] > top1[0] + 15 and top1[-1] > 25, top1  # chance is 10; 52.6 here (2026-11-28)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["naflex_loader"] and saved["resolved"]["naflex_patch_size"] == 4
    assert saved["resolved"]["classes"] == CLASSES  # the data set's ClassLabel names

    # The eval command feeds the checkpoint the run's own validation input (16-patch sequences).
    checkpoint = str(run_dir / f"epoch-{EPOCHS - 1:04d}")
    evaluated = evaluate_checkpoint(checkpoint, workers=0)
    assert evaluated["samples"] == 359 and evaluated["top1"] == pytest.approx(last["eval_top1"], abs=1e-6)
    # predict too: image files in, the data set's class names out
    val = load_digits_source().val
    for i in range(2):
        Image.fromarray(val.images[i], "L").save(tmp_path / f"{i}.png")
    rows = predict(checkpoint, [str(tmp_path / "0.png"), str(tmp_path / "1.png")], topk=3, device="cpu")
    assert [len(r["classes"]) for r in rows] == [3, 3] and all(c in CLASSES for r in rows for c in r["classes"])
