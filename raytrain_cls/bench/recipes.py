"""gpu-checks' ``recipe`` step: the GPU paths that issue 27 asks to see train, each run as a user runs it.

Every variant is a ``raytrain-cls train`` process of its own on one recipe (gpu-checks uses the Fashion-MNIST
time-to-accuracy recipe), shortened to a few epochs: bf16 (the recipe's), fp16 with its GradScaler, that fp16 run
resumed from its directory for one more epoch, local mode, ``--torchcompile``, and ``--sync-bn`` on one GPU worker
(taken, but a no-op there, as in timm: one process has nothing to sync). A variant passes when its command ends
with status 0 and its summary.csv holds exactly the epochs asked for, every loss finite and the last top-1 above
``min_top1``: a GradScaler that skipped every step (or a compiled graph that trains nothing) leaves the model at chance.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytrain_cls.run.report import SUMMARY_FILE, read_summary


@dataclass(frozen=True)
class Variant:
    name: str  # also the run's --experiment name
    flags: tuple[str, ...]
    epochs: int  # the epochs its summary.csv must hold when it ends
    resumes: Optional[str] = None  # the variant whose run this one continues (--resume NAME), else a new run


GPU_VARIANTS = (
    Variant("bf16", ("--epochs", "2"), 2),
    Variant("fp16", ("--amp-dtype", "float16", "--epochs", "2"), 2),
    Variant("fp16-resumed", ("--epochs", "3"), 3, resumes="fp16"),
    Variant("local", ("--num-workers", "0", "--epochs", "2"), 2),
    Variant("compile", ("--torchcompile", "inductor", "--epochs", "2"), 2),  # the costliest: inductor compiles first
    Variant("sync-bn", ("--sync-bn", "--epochs", "1"), 1),  # last: on one GPU worker it only shows the flag is taken
)


def command(recipe: Optional[str], variant: Variant, flags: Sequence[str], output: str) -> list[str]:
    """The train command line of ``variant``: a new run named after it, or the resume of another's run (which
    brings its own config.yaml, so no recipe)."""
    if variant.resumes:
        start = ["--resume", variant.resumes]
    else:
        start = [*(["-c", recipe] if recipe else []), "--experiment", variant.name]
    return [sys.executable, "-m", "raytrain_cls", "train", *start, "--output", output, *flags, *variant.flags]


def check_summary(run_dir: Path, epochs: int, min_top1: float) -> dict:
    """The run's epochs, losses and top-1s from its summary.csv; raises ValueError where they do not show a run
    that trained ``epochs`` epochs."""
    rows = read_summary(run_dir / SUMMARY_FILE)
    if sorted(rows) != list(range(epochs)):
        raise ValueError(f"{run_dir / SUMMARY_FILE} holds epochs {sorted(rows)}, expected 0..{epochs - 1}")
    losses = [float(rows[e][key]) for e in sorted(rows) for key in ("train_loss", "eval_loss") if rows[e][key]]
    if not all(math.isfinite(loss) for loss in losses):
        raise ValueError(f"a loss is not finite: {losses}")
    top1 = [float(rows[e]["eval_top1"]) for e in sorted(rows)]
    if top1[-1] <= min_top1:
        raise ValueError(f"top-1 {top1[-1]:.2f} after {epochs} epochs, not above {min_top1}: it did not train")
    return dict(epochs=epochs, top1=top1, train_loss=[float(rows[e]["train_loss"]) for e in sorted(rows)])


def run_variant(
    recipe: Optional[str],
    variant: Variant,
    flags: Sequence[str],
    output: str,
    min_top1: float = 20.0,
    timeout: float = 600,
) -> dict:
    """Runs ``variant`` as its own process and checks what it left; raises RuntimeError (with the end of its
    output) where it failed, so gpu-checks records the error and goes on."""
    start = time.perf_counter()
    proc = subprocess.run(command(recipe, variant, flags, output), capture_output=True, text=True, timeout=timeout)
    wall_s = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"train exited {proc.returncode} after {wall_s} s: {(proc.stderr or proc.stdout)[-1500:]}")
    try:
        checked = check_summary(Path(output) / (variant.resumes or variant.name), variant.epochs, min_top1)
    except ValueError as e:
        raise RuntimeError(f"{e}; its output ends: {proc.stderr[-800:]}") from None
    return dict(variant=variant.name, command_s=wall_s, flags=" ".join(variant.flags), **checked)
