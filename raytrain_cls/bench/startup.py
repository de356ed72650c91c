"""`raytrain-cls bench startup`: a run's start-up against a bare script's, side by side on the same job.

    raytrain-cls bench startup [-c RECIPE] [--repeats 3] [-- TRAIN FLAGS]

Each repeat runs four commands, each in a process of its own, one after the other:

* bare: the same job in one plain Python process without Ray: the project's data source, loader, model and
  optimizer (rank 0 of 1), until its first training step is done. What a hand-written script would do.
* ray_train: Ray Train's own floor on the same cluster: a TorchTrainer with one CPU worker whose train function
  does nothing, clocked from its process's start to the function's first line. No run of ours can start faster
  than this; what train spends above it is ours (imports, data, model, first step).
* train: `raytrain-cls train` with the same flags and ``--epochs 1``, on a fresh private local Ray, or on the
  cluster RAY_ADDRESS names when it is set (then Ray's own start is not paid).
* local: the same command in local mode (``--num-workers 0``): the run trains in the command's own process, with
  no Ray at all, so it is the one that can come within 2x of the bare script where Ray Train's floor cannot.

Every clock runs from its process's start (as run.startup reads it) to the end of the first training step (the
floor's: to its function's first line). One JSON line per command, then a table of the ratio and of train's
breakdown (where its seconds go).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

TARGET_RATIO = 2.0  # issue 26: command start to first step within 2x of a bare script's


def add_parser(sub) -> None:
    p = sub.add_parser(
        "startup",
        help="command start to first step: raytrain-cls train (on Ray, and in local mode) vs a bare script, the ratios",
    )
    p.add_argument("-c", "--config", default=None, help="a recipe name or YAML file (as in train)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="train flags after --, e.g. -- --model resnet18 -b 64")


def bare_main(argv: Sequence[str]) -> None:
    """The bare script (run as its own process by ``main``): the job's first step without Ray, timed from the
    process start; prints one JSON line."""
    from raytrain_cls.run.startup import process_start  # light: the stamps module imports no Ray

    started = process_start(command=True)
    import timm.data
    import torch

    from raytrain_cls.commands.cli import base_recipe, build_parser, overrides_of
    from raytrain_cls.core.config import load_config
    from raytrain_cls.core.model import build_model
    from raytrain_cls.core.optim import build_optimizer
    from raytrain_cls.data.loader import build_loaders
    from raytrain_cls.data.registry import build_source
    from raytrain_cls.data.transforms import data_config_kwargs

    imported = time.time()
    args = build_parser().parse_args(["train", *argv])
    cfg = load_config(base_recipe(args), overrides_of(args)).validate()
    source = build_source(cfg)
    num_classes = cfg.model.num_classes or source.num_classes
    # the device a run of this config trains on (a hand-written script pays CUDA's start-up too)
    device = torch.device("cuda:0" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(cfg, num_classes, device)
    data_config = timm.data.resolve_data_config(args=data_config_kwargs(cfg), model=model)
    loaders = build_loaders(cfg, source, dict(data_config, input_size=list(data_config["input_size"])), 0, 1)
    optimizer = build_optimizer(cfg, model)
    loaders.set_epoch(0)
    x, y = (t.to(device) for t in next(iter(loaders.train))[:2])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the step is done when the GPU is, not when its kernels are queued
    done = time.time()
    print(json.dumps(dict(path="bare", first_step_s=round(done - started, 2), imports_s=round(imported - started, 2))))


def ray_train_floor_main() -> None:
    """Ray Train's floor (run as its own process by ``main``): an empty train function on one CPU worker, on the
    cluster train would use (RAY_ADDRESS's, else a private local Ray started as train starts it); prints one JSON
    line. Imports only what Ray Train itself does (ray.train, torch): no timm, none of the driver."""
    from raytrain_cls.run.startup import process_start

    started = process_start(command=True)
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytrain_cls.run.local_ray import start_private_ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
    else:
        start_private_ray()

    def entered() -> float:  # nested: pickled by value, so the worker imports nothing of ours (no torch, no timm)
        import time

        return time.time()

    with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-floor-") as storage:
        result = TorchTrainer(
            entered,
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(storage_path=storage, name="floor"),
        ).fit()
    print(json.dumps(dict(path="ray_train", first_step_s=round(result.return_value - started, 2))))


def _ray_train_floor() -> dict:
    code = "from raytrain_cls.bench.startup import ray_train_floor_main; ray_train_floor_main()"
    return _json_line_of([sys.executable, "-c", code], "the Ray Train floor script")


def _json_line_of(cmd: Sequence[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    line = next((s for s in reversed(proc.stdout.splitlines()) if s.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{what} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(line)


def _bare(argv: Sequence[str]) -> dict:
    code = "import sys; from raytrain_cls.bench.startup import bare_main; bare_main(sys.argv[1:])"
    return _json_line_of([sys.executable, "-c", code, *argv], "the bare script")


def _train(argv: Sequence[str], output: str) -> dict:
    """`raytrain-cls train ARGV --epochs 1`: its start-up from its result.json."""
    cmd = [sys.executable, "-m", "raytrain_cls", "train", *argv, "--epochs", "1", "--output", output]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"raytrain-cls train exited {proc.returncode}: {proc.stderr[-1500:]}")
    result = json.loads(next(Path(output).glob("*/result.json")).read_text())
    startup = result["startup"]
    return dict(path="train", first_step_s=startup["total_s"], phases=startup["phases"], until=startup["until"])


def run_command(recipe: Optional[str], overrides: Sequence[str], repeats: int = 1) -> dict:
    """`raytrain-cls bench startup` in a process of its own (gpu-checks' ``startup`` step): its last repeat's
    line, with ``ok``/``local_ok`` renamed ``target_met``/``local_target_met`` (a gpu-checks row's ``ok`` says
    that the step ran)."""
    cmd = [sys.executable, "-m", "raytrain_cls", "bench", "startup", "--repeats", str(repeats)]
    cmd += [*(["-c", recipe] if recipe else []), "--", *overrides]
    line = _json_line_of(cmd, "bench startup")
    line["target_met"], line["local_target_met"] = line.pop("ok"), line.pop("local_ok")
    return line


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: the bare and floor processes import this module, and bench.common imports the driver
    # (torch, timm, Ray), which would be counted in their start-up.
    from raytrain_cls.bench.common import environment, print_table

    argv = [*(["-c", args.config] if args.config else []), *args.overrides]
    rows = []
    for repeat in range(args.repeats):
        bare = _bare(argv)
        floor = _ray_train_floor()
        with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-startup-") as out:
            train = _train(argv, out)
        with tempfile.TemporaryDirectory(prefix="raytrain-cls-bench-startup-local-") as out:
            local = _train([*argv, "--num-workers", "0"], out)
        ratio = round(train["first_step_s"] / bare["first_step_s"], 2)
        local_ratio = round(local["first_step_s"] / bare["first_step_s"], 2)
        row = dict(
            bench="startup",
            repeat=repeat,
            cluster=os.environ.get("RAY_ADDRESS") or "fresh local Ray",
            bare_s=bare["first_step_s"],
            ray_train_floor_s=floor["first_step_s"],
            train_s=train["first_step_s"],
            ratio=ratio,
            local_s=local["first_step_s"],
            local_ratio=local_ratio,
            target=TARGET_RATIO,
            ok=ratio <= TARGET_RATIO,
            local_ok=local_ratio <= TARGET_RATIO,
            train_phases=train["phases"],
            local_phases=local["phases"],
        )
        rows.append(row)
        print(json.dumps({**row, **environment("cuda")}, default=str), flush=True)  # the GPU's name if any
    print_table(
        "bench startup: command start to first step (ray_train_floor: an empty train function's first line)",
        rows,
        ("repeat", "bare_s", "ray_train_floor_s", "train_s", "ratio", "ok", "local_s", "local_ratio", "local_ok"),
    )
    for path in ("train", "local"):
        last = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in rows[-1][f"{path}_phases"])
        print(f"{path}'s last start-up: {last}", file=sys.stderr)
    return 0
