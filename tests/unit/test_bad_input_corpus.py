"""The bad-input corpus: what a careless or hostile user types, command by command. Each case names the command
line, the exit code and the words its message must hold; none may print a traceback, none of train's or tune's
may contact Ray, and the file system is checked afterwards where a mistake could lose or misplace files.

Everything the cases use (a trained checkpoint, a corrupt one, one of another model, prepared shards with a
tampered shard) is made here, small, in a module-scoped folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image
from records import resolved_record

import raytrain_cls.run.driver
import raytrain_cls.run.tune
from raytrain_cls.commands.cli import EXIT_FAILED, EXIT_USAGE
from raytrain_cls.core.config import Config
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.core.state import MODEL_FILE, STATE_FILE, TrainState, save_weights
from raytrain_cls.data.prepare import prepare
from raytrain_cls.entry import main


def checkpoint(directory: Path, model_name: str = "test_resnet") -> Path:
    """A checkpoint of a digits run, as a worker writes it (untrained weights: only loading is under test)."""
    cfg = Config().update({"dataset": "digits", "model": model_name, "img_size": 16}).validate()
    cfg.resolved = resolved_record()
    model = timm.create_model(model_name, num_classes=10)
    return TrainState(cfg.to_dict(), model, build_optimizer(cfg, model)).save(directory)


@dataclass
class Corpus:
    root: Path
    good: Path  # a checkpoint that loads
    corrupt: Path  # a bit flipped in its state.pt
    other_model: Path  # meta.json says test_resnet; the weights are another model's (checksums re-recorded)
    no_weights: Path  # model.safetensors deleted
    other_weights: Path  # a bare .safetensors file of another architecture
    image: Path
    a_file: Path  # a plain file, where a folder is expected
    shards: Path  # prepared digits shards, one shard tampered with
    user_folder: Path  # someone's folder with a manifest.json among their own files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    good = checkpoint(root / "good")
    corrupt = checkpoint(root / "corrupt")
    data = bytearray((corrupt / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupt / STATE_FILE).write_bytes(bytes(data))
    other_model = checkpoint(root / "other-model")
    save_weights(timm.create_model("test_vit", num_classes=10), other_model / MODEL_FILE)
    meta = json.loads((other_model / "meta.json").read_text())
    from raytrain_cls.core.state import file_digest

    meta["files"][MODEL_FILE] = file_digest(other_model / MODEL_FILE)
    (other_model / "meta.json").write_text(json.dumps(meta))
    no_weights = checkpoint(root / "no-weights")
    (no_weights / MODEL_FILE).unlink()
    other_weights = root / "vit.safetensors"
    save_weights(timm.create_model("test_vit", num_classes=10), other_weights)
    image = root / "seven.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)).save(image)
    a_file = root / "a-file"
    a_file.write_text("not a folder\n")
    shards = root / "shards"
    prepare("digits", str(shards), shard_size=512, workers=0, log=lambda _: None)
    for shard in shards.rglob("*.parquet"):  # every split's: eval reads validation, predict every split
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        shard.write_bytes(bytes(raw))
    user_folder = root / "user-folder"
    user_folder.mkdir()
    (user_folder / "manifest.json").write_text("{}")
    (user_folder / "thesis.tex").write_text("three years of work\n")
    return Corpus(root, good, corrupt, other_model, no_weights, other_weights, image, a_file, shards, user_folder)


class RayContacted(BaseException):
    """BaseException: not caught by the command's own error handling, so the test sees it."""


@pytest.fixture
def ray_forbidden(monkeypatch):
    # Imported here, before the patch: a module that first imports `connect` while it is patched keeps the
    # refusal for the rest of the session (an integration test's `eval` then fails), where this undoes it.
    from raytrain_cls.commands import inference

    def refuse(*args, **kwargs):
        raise RayContacted("Ray was contacted before the mistake was reported")

    monkeypatch.setattr(raytrain_cls.run.driver, "connect", refuse)
    monkeypatch.setattr(raytrain_cls.run.tune, "connect", refuse)
    monkeypatch.setattr(inference, "connect", refuse)


# (id, command line with {placeholders} for the corpus's paths, exit code, words the message must hold)
CASES = [
    # train: everything that can be checked is checked before Ray starts
    ("train-unknown-model", "train --model resnet_nope", EXIT_USAGE, ["model.model", "not a timm model"]),
    ("train-model-kwargs-typo", "train --model-kwargs drop_rat=0.1", EXIT_USAGE, ["model.model_kwargs", "drop_rat"]),
    ("train-negative-lr", "train --lr -1", EXIT_USAGE, ["optim.lr"]),
    ("train-unknown-aa-policy", "train --aa nope", EXIT_USAGE, ["aug.aa", "training transforms"]),
    (
        "train-teacher-not-weights",
        "train --kd-model-name test_resnet --kd-model-path {image}",
        EXIT_USAGE,
        ["loss.kd_model_path", "not a readable weights file"],
    ),
    (
        "train-teacher-other-architecture",
        "train --kd-model-name test_resnet --kd-model-path {other_weights}",
        EXIT_USAGE,
        ["vit.safetensors", "another architecture"],
    ),
    ("train-config-not-a-mapping", "train -c {a_file}", EXIT_USAGE, ["--config", "mapping"]),
    ("train-batch-over-the-data", "train --batch-size 100000", EXIT_USAGE, ["data.batch_size", "training samples"]),
    ("train-pretrained-not-weights", "train --pretrained-path {image}", EXIT_USAGE, ["model.pretrained_path"]),
    ("train-missing-recipe", "train -c {root}/nope.yaml", EXIT_USAGE, ["--config"]),
    ("train-missing-data-dir", "train --data-dir {root}/nowhere", EXIT_USAGE, ["nowhere"]),
    ("train-data-dir-is-a-file", "train --data-dir {a_file}", EXIT_USAGE, ["a-file"]),
    ("train-empty-data-dir", "train --data-dir {root}/empty", EXIT_USAGE, ["empty"]),
    ("train-experiment-escapes", "train --experiment ../escaped --output {root}/runs", EXIT_USAGE, ["experiment"]),
    ("train-experiment-deep", "train --experiment ../../../x --output {root}/runs", EXIT_USAGE, ["experiment"]),
    ("train-experiment-dot", "train --experiment . --output {root}/runs", EXIT_USAGE, ["experiment"]),
    ("train-output-in-a-file", "train --output {a_file}/runs", EXIT_USAGE, ["checkpoint.output", "inside the file"]),
    ("train-output-is-a-file", "train --output {a_file}", EXIT_USAGE, ["checkpoint.output", "is a file"]),
    ("train-resume-corrupt", "train --resume {corrupt} --output {root}/runs", EXIT_USAGE, ["state.pt", "corrupt"]),
    ("train-resume-missing", "train --resume {root}/nowhere --output {root}/runs", EXIT_USAGE, ["checkpoint.resume"]),
    (
        "train-resume-other-model",
        "train --resume {good} --model resnet10t --output {root}/runs",
        EXIT_USAGE,
        ["another architecture"],
    ),
    (
        "train-initial-checkpoint-other-model",
        "train --initial-checkpoint {other_weights} --model test_resnet --output {root}/runs",
        EXIT_USAGE,
        ["vit.safetensors", "another architecture"],
    ),
    (
        "train-initial-checkpoint-missing",
        "train --initial-checkpoint {root}/nope.safetensors",
        EXIT_USAGE,
        ["initial_checkpoint"],
    ),
    # tune: spec mistakes fail before any trial
    (
        "tune-empty-choice",
        "tune --search lr=choice: --output {root}/searches",
        EXIT_USAGE,
        ["search.space.lr", "no values"],
    ),
    ("tune-repeated-grid", "tune --search lr=grid:0.1,0.1 --output {root}/searches", EXIT_USAGE, ["0.1"]),
    ("tune-unknown-metric", "tune --metric foo --output {root}/searches", EXIT_USAGE, ["search.metric", "foo"]),
    ("tune-experiment-escapes", "tune --experiment ../x --output {root}/searches", EXIT_USAGE, ["experiment"]),
    ("tune-resume-not-a-search", "tune --resume {root}/empty", EXIT_USAGE, ["--resume", "not a search directory"]),
    ("tune-unknown-model", "tune --model resnet_nope --output {root}/searches", EXIT_USAGE, ["not a timm model"]),
    # eval
    ("eval-missing-checkpoint", "eval {root}/nowhere", EXIT_USAGE, ["nowhere"]),
    ("eval-corrupt", "eval {corrupt}", EXIT_USAGE, ["state.pt", "corrupt"]),
    ("eval-other-model-weights", "eval {other_model}", EXIT_USAGE, ["another architecture"]),
    ("eval-batch-size-0", "eval {good} --batch-size 0", EXIT_USAGE, ["--batch-size", "at least 1"]),
    ("eval-negative-workers", "eval {good} -j -1", EXIT_USAGE, ["--workers", "at least 0"]),
    ("eval-negative-tta", "eval {good} --tta -1", EXIT_USAGE, ["--tta"]),
    ("eval-crop-pct-2", "eval {good} --crop-pct 2", EXIT_USAGE, ["--crop-pct", "(0, 1]"]),
    ("eval-crop-pct-text", "eval {good} --crop-pct big", EXIT_USAGE, ["--crop-pct"]),
    ("eval-ema-missing", "eval {good} --use-ema", EXIT_USAGE, ["no EMA weights"]),
    ("eval-results-in-a-file", "eval {good} --results-file {a_file}/r.json", EXIT_USAGE, ["--results-file"]),
    (
        "eval-tampered-shards",
        "eval {good} --dataset parquet --data-dir {shards} -j 0",
        EXIT_USAGE,
        ["shard", "sha256"],
    ),
    ("eval-unknown-dataset", "eval {good} --dataset imagenet_nope", EXIT_USAGE, ["data.dataset"]),
    # predict
    ("predict-missing-image", "predict {good} {root}/nope.png", EXIT_USAGE, ["no such image"]),
    ("predict-topk-0", "predict {good} {image} --topk 0", EXIT_USAGE, ["--topk"]),
    ("predict-corrupt", "predict {corrupt} {image}", EXIT_USAGE, ["corrupt"]),
    ("predict-out-in-a-file", "predict {good} {image} --out {a_file}/p.csv", EXIT_USAGE, ["--out"]),
    ("predict-tampered-shards", "predict {good} {shards}", EXIT_USAGE, ["sha256"]),
    ("predict-no-images", "predict {good} {root}/empty", EXIT_USAGE, ["no images"]),
    # export: refused before anything is written
    ("export-no-weights", "export {no_weights} {root}/exports/a", EXIT_USAGE, ["model.safetensors"]),
    ("export-corrupt", "export {corrupt} {root}/exports/b", EXIT_USAGE, ["corrupt"]),
    ("export-other-model", "export {other_model} {root}/exports/c", EXIT_USAGE, ["another architecture"]),
    ("export-into-a-file", "export {good} {a_file}/out", EXIT_USAGE, ["inside the file"]),
    ("export-not-a-checkpoint", "export {root}/empty {root}/exports/d", EXIT_USAGE, ["meta.json"]),
    # prepare: never deletes what it did not write
    ("prepare-over-user-files", "prepare digits {user_folder} -j 0", EXIT_USAGE, ["user-folder"]),
    ("prepare-dst-inside-a-file", "prepare digits {a_file}/sub -j 0", EXIT_USAGE, ["inside the file"]),
    ("prepare-class-map-for-digits", "prepare digits {root}/p2 --class-map {a_file}", EXIT_USAGE, ["--class-map"]),
    ("prepare-missing-src", "prepare {root}/nowhere {root}/prepared -j 0", EXIT_USAGE, ["nowhere"]),
    # plot
    ("plot-missing-dir", "plot {root}/nowhere", EXIT_USAGE, ["nowhere"]),
]


def run(argv: list[str]) -> int:
    """The command's exit code; argparse's own usage errors exit through SystemExit, as on a real command line."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def command_line(template: str, corpus: Corpus) -> list[str]:
    (corpus.root / "empty").mkdir(exist_ok=True)
    paths = {k: str(v) for k, v in vars(corpus).items()}
    return [part.format(**paths) for part in template.split()]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_ends_in_its_message_not_a_traceback(case, corpus, capsys, ray_forbidden):
    _, template, expected_code, words = case
    code = run(command_line(template, corpus))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == expected_code, err
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert message.startswith("raytrain-cls"), err  # ours, or argparse's "raytrain-cls eval: error: ..."
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "bug of raytrain-cls" not in message  # a user's mistake is never reported as our bug


def test_nothing_is_written_outside_output_or_left_half_made(corpus, capsys, ray_forbidden):
    """After every case above: nothing escaped the corpus folder, no export folder exists, and the user's files
    beside a manifest.json are untouched."""
    for case in CASES:
        run(command_line(case[1], corpus))
    capsys.readouterr()
    assert not (corpus.root.parent / "escaped").exists() and not (corpus.root.parent / "x").exists()
    assert not (corpus.root / "exports").exists()
    assert sorted(p.name for p in corpus.user_folder.iterdir()) == ["manifest.json", "thesis.tex"]
    assert (corpus.user_folder / "thesis.tex").read_text() == "three years of work\n"
    runs = corpus.root / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run directory was started by a refused run


def test_an_unexpected_error_is_one_line_that_says_bug(monkeypatch, capsys):
    """The net under everything: an error that is not the user's is one line naming it a bug, exit 1; with
    RAYTRAIN_CLS_TRACEBACK=1 the traceback is there for the report."""
    import raytrain_cls.commands.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "plot", broken)
    assert main(["plot", "anywhere"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bug of raytrain-cls" in err and "ZeroDivisionError" in err
    monkeypatch.setenv("RAYTRAIN_CLS_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["plot", "anywhere"])


@pytest.mark.parametrize("case", ["train-unknown-model", "export-corrupt"])
def test_as_a_process_no_traceback_either(case, corpus):
    """The real command line, in its own process: exit code and stderr as a user sees them."""
    template, expected_code = next((c[1], c[2]) for c in CASES if c[0] == case)
    env = {**os.environ, "RAY_ADDRESS": ""}  # a stray cluster address must not matter: nothing reaches Ray
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_cls", *command_line(template, corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == expected_code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("raytrain-cls: ")


def test_bench_ends_a_mistake_the_same_way(capsys):
    assert run(["bench", "checkpoint", "--model", "resnet_nope"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith("raytrain-cls: ") and "not a timm model" in err
