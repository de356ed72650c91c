"""timm's options all at once on 2 gloo workers: the loop runs them together and the model still learns."""

import csv
import json

import pytest
import torch
import yaml

from raytrain_cls.commands.cli import EXIT_OK, main

pytestmark = pytest.mark.integration

# bf16 autocast where the CPU has oneDNN's bf16 kernels (AVX512-BF16, AMX). Without them each bf16 convolution runs
# emulated, ~50x slower than fp32 (resnet10t: 6 s a step on an AVX2-only EPYC), and this run alone took 12 minutes;
# the bf16 step itself stays covered there by the unit tests (test_engine, test_timm_parity).
BF16_AUTOCAST = ["--amp", "--amp-dtype", "bfloat16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []


def test_kitchen_sink_recipe_trains_and_improves(ray_local, tmp_path):
    """Feature distillation among the rest: resnet10t's 512-wide features onto an untrained teacher's 96 (weighted
    lightly, it must only not break the loop); the student+projection module runs under DDP and the projection's
    weights ride in the checkpoint. (Logit distillation is the unit tests'; token distillation is below.)"""

    from raytrain_cls.core.state import STATE_FILE

    code = main(
        [
            "train",
            "--num-workers",
            "2",
            "--model",
            "resnet10t",
            *save_teacher(tmp_path / "teacher.safetensors"),
            "--kd-distill-type",
            "feature",
            "--task-loss-weight",
            "0.9",
            "--epochs",
            "4",
            "--cooldown-epochs",
            "1",
            "--warmup-epochs",
            "1",
            "--aa",
            "rand-m9-mstd0.5-inc1",
            "--reprob",
            "0.25",
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--smoothing",
            "0.1",
            "--drop-path",
            "0.05",
            "--model-ema",
            "--model-ema-decay",
            "0.9",
            "--clip-grad",
            "0.05",
            "--clip-mode",
            "agc",
            "--grad-accum-steps",
            "2",
            *BF16_AUTOCAST,
            "--bn-momentum",
            "0.05",
            "--dist-bn",
            "reduce",
            "--log-wandb",
            "--wandb-tags",
            "sink",
            "--output",
            str(tmp_path),
            "--experiment",
            "sink",
        ]
    )
    assert code == EXIT_OK
    run_dir = tmp_path / "sink"
    with (run_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # 4 epochs + 1 cooldown: the schedule's real length
    top1 = [float(r["eval_top1"]) for r in rows]
    assert top1[-1] > top1[0] and top1[-1] > 30, top1  # learns despite all the regularisation
    last = json.loads((run_dir / "result.json").read_text())["last_metrics"]
    assert "model_eval_top1" in last  # EMA evaluated alongside the raw model, as timm does
    wandb_id = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]["wandb_id"]
    records = list((run_dir / "wandb").glob(f"offline-run-*/run-{wandb_id}.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0  # rank 0 logged to W&B (offline here)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]["num_workers"] == 2  # under DDP
    state = torch.load(run_dir / "epoch-0004" / STATE_FILE, weights_only=True)
    assert state["aux"]["weight"].shape == (96, 512)


def save_teacher(path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return ["--kd-model-name", "test_resnet", "--kd-model-path", str(path)]


def test_timms_own_args_yaml_runs_with_token_distillation(ray_local, tmp_path):
    """`-c args.yaml` as timm's train.py writes it (every key), the command line picking the data and a tiny
    distilled-token student: the run trains on 2 workers, token distillation included, and its config.yaml keeps
    timm's values for everything not overridden."""
    from pathlib import Path

    args_yaml = Path(__file__).parents[1] / "data" / "timm_args.yaml"
    # a ViT's size is the model's (timm's --img-size only sizes the data): --model-kwargs img_size=32
    code = main(
        [
            "train",
            "-c",
            str(args_yaml),
            "--num-workers",
            "2",
            "--dataset",
            "sklearn/digits",
            "--img-size",
            "32",
            "--model",
            "deit_tiny_distilled_patch16_224",
            "--model-kwargs",
            "img_size=32",
            "depth=1",
            "embed_dim=32",
            "num_heads=2",
            *save_teacher(tmp_path / "t.safetensors"),
            "--kd-distill-type",
            "token",
            "--task-loss-weight",
            "0.8",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "-b",
            "32",
            "-j",
            "0",
            "--log-interval",
            "100",
            "--output",
            str(tmp_path),
            "--experiment",
            "timm",
        ]
    )
    assert code == EXIT_OK
    saved = yaml.safe_load((tmp_path / "timm" / "config.yaml").read_text())
    assert saved["optim"]["weight_decay"] == 2e-5 and saved["loss"]["smoothing"] == 0.1
    assert saved["loss"]["kd_distill_type"] == "token"
    workers = saved["resolved"]["num_workers"]
    assert saved["resolved"]["lr"] == pytest.approx(0.1 * 32 * workers / 256)  # timm's rule: lr_base * batch / 256
    with (tmp_path / "timm" / "summary.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0"]
