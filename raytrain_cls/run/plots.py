"""PNG plots of a run (loss, accuracy, lr per epoch) and of a search (each trial's metric curve)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from raytrain_cls.core.storage import is_uri, join, read_text, split, write_bytes
from raytrain_cls.run.report import SUMMARY_FILE, read_summary, trial_run_dir

RUN_PLOTS = ("loss.png", "accuracy.png", "lr.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    if is_uri(path):  # a search directory on cloud storage: one object put
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        write_bytes(path, buf.getvalue())
    else:
        fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_run(run_dir: str | Path) -> list[str]:
    """loss.png (train and eval), accuracy.png (top-1, top-5), lr.png, from the run's summary.csv (the run
    directory a local path or a URI)."""
    run_dir = str(run_dir)
    rows = read_summary(join(run_dir, SUMMARY_FILE))
    if not rows:
        raise FileNotFoundError(f"{join(run_dir, SUMMARY_FILE)} is missing or empty: not a run directory with epochs")
    epochs = sorted(rows)

    def col(name):
        return [float(rows[e][name]) for e in epochs]

    plt = _pyplot()
    out = []
    for name, series, ylabel in (
        ("loss.png", ("train_loss", "eval_loss"), "loss"),
        ("accuracy.png", ("eval_top1", "eval_top5"), "accuracy (%)"),
        ("lr.png", ("lr",), "learning rate"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in series:
            ax.plot(epochs, col(s), marker="o", markersize=3, label=s)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{split(run_dir)[1]}: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, join(run_dir, name))
        out.append(join(run_dir, name))
    return out


def plot_curves(path: str | Path, curves: Sequence[tuple[str, bool, list]], metric: str) -> str | Path:
    """One line per trial: (label, completed, values per epoch); stopped trials dotted, so visibly shorter."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, completed, values in curves:
        if values:
            ax.plot(range(len(values)), values, "-" if completed else ":", marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("trials (dotted: stopped early)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return path


def plot_search(search_dir: str | Path) -> str:
    """trials.png from a search's trials.csv and each trial's summary.csv (a local path or a URI)."""
    search_dir = str(search_dir)
    text = read_text(join(search_dir, "trials.csv"))
    if text is None:
        raise FileNotFoundError(f"{join(search_dir, 'trials.csv')} is missing: not a finished search directory")
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    metric = next(
        (c[len("best_") :] for c in reader.fieldnames or [] if c.startswith("best_") and c != "best_epoch"), "eval_top1"
    )
    curves = []
    for r in rows:
        summary = read_summary(join(trial_run_dir(search_dir, r["trial_id"]), SUMMARY_FILE))
        values = (
            [float(summary[e][metric]) for e in sorted(summary)] if metric in next(iter(summary.values()), {}) else []
        )
        curves.append((f"{r['trial_id']} ({r['status']})", r["status"] == "completed", values))
    return plot_curves(join(search_dir, "trials.png"), curves, metric)
