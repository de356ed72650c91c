"""What a run tells its user: console lines on rank 0, summary.csv (timm's columns) and result.json.

summary.csv gets a row per reported epoch (record_epoch): from a Ray Train ``UserCallback`` in the Train controller
(train_controller.SummaryCallback), on the driver's node, so the file grows live while the run trains and survives a
dead driver; or from the process that trains, where no Ray Train run does (local mode, in-process Tune trials).
Rows are keyed by epoch: when a worker-group restart repeats an epoch, its row is replaced, never duplicated.
Ray-free: a run in the command's own process never imports ray.train.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from raytrain_cls.core.storage import is_uri, join, read_text, write_text

SUMMARY_FILE = "summary.csv"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
# Reported by rank 0 with every epoch: the Tune driver frees a stopped trial's placement group by it (tune.py).
PLACEMENT_GROUP_METRIC = "ray_placement_group"
# timm's summary.csv columns, in timm's order.
SUMMARY_COLUMNS = (
    "epoch",
    "train_loss",
    "eval_loss",
    "eval_top1",
    "eval_top5",
    "lr",
    "workers",  # the worker count(s) that trained the epoch: "2", or "1,2" where an elastic run grew during it
    "grad_accum",  # the accumulation steps of each of those sizes
    "global_batch",
)


def step_line(m: dict, num_epochs: int) -> str:
    pct = 100.0 * m["step"] / max(m["steps"], 1)
    return (
        f"Train: {m['epoch']}/{num_epochs - 1} [{m['step']:>4d}/{m['steps']} ({pct:3.0f}%)]  "
        f"loss {m['loss']:.4f}  lr {m['lr']:.3e}  {m['img_per_sec']:.0f} img/s  "
        f"data {m['data_time']:.1f}s"
    )


def epoch_line(m: dict, num_epochs: int) -> str:
    if "eval_loss" not in m:  # an epoch --val-interval does not evaluate
        return (
            f"Epoch {m['epoch']}/{num_epochs - 1}: train_loss {m['train_loss']:.4f}  lr {m['lr']:.3e}  "
            f"{m['img_per_sec']:.0f} img/s  (not evaluated: --val-interval)"
        )
    best = "" if m.get("best_metric") is None else f"  (best {m['best_metric']:.4f} @ epoch {m['best_epoch']})"
    return (
        f"Epoch {m['epoch']}/{num_epochs - 1}: train_loss {m['train_loss']:.4f}  "
        f"eval_loss {m['eval_loss']:.4f}  top1 {m['eval_top1']:.2f}  top5 {m['eval_top5']:.2f}  "
        f"lr {m['lr']:.3e}  {m['img_per_sec']:.0f} img/s{best}"
    )


def read_summary(path: str | Path) -> dict[int, dict]:
    text = read_text(path)
    if not text:
        return {}
    return {int(row["epoch"]): row for row in csv.DictReader(io.StringIO(text))}


def sizes_per_epoch(run_dir: str) -> list[dict]:
    """Each epoch's worker count(s), accumulation steps and global batch, from summary.csv: result.json's
    ``epochs`` (an elastic run's sizes change between and within epochs; a fixed run's never do)."""
    rows = read_summary(join(run_dir, SUMMARY_FILE))
    return [
        dict(
            epoch=epoch,
            workers=row.get("workers") or None,
            grad_accum=row.get("grad_accum") or None,
            global_batch=int(row["global_batch"]) if row.get("global_batch") else None,
        )
        for epoch, row in sorted(rows.items())
    ]


def write_summary(path: str | Path, rows: dict[int, dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for epoch in sorted(rows):
        writer.writerow(rows[epoch])
    write_text(path, buf.getvalue())


def record_epoch(path: str, metrics: dict) -> None:
    """summary.csv's row for the epoch these metrics report (replacing an earlier one for the same epoch)."""
    if "epoch" not in metrics or metrics.get("recovery"):
        return  # mid-epoch recovery checkpoints have no evaluation: no summary row
    rows = read_summary(path)
    rows[int(metrics["epoch"])] = {k: metrics.get(k) for k in SUMMARY_COLUMNS}
    write_summary(path, rows)


def build_result(result, metric: str, mode: str, run_dir: Optional[str] = None) -> dict:
    """result.json from Ray Train's Result: the metric, its best value and epoch, the last metrics and the
    checkpoint paths. On cloud storage Ray gives bucket-relative paths ("bucket/runs/x/epoch-0003"); with the run's
    own `run_dir` URI they become URIs the other commands open (s3://bucket/runs/x/epoch-0003?options)."""
    run_dir = run_dir or result.path

    def where(checkpoint) -> Optional[str]:
        if checkpoint is None:
            return None
        return join(run_dir, Path(checkpoint.path).name) if is_uri(run_dir) else checkpoint.path

    kept = [(where(c), m) for c, m in result.best_checkpoints or []]
    return result_payload(dict(result.metrics or {}), where(result.checkpoint), kept, metric, mode, run_dir)


def result_payload(
    last: dict, latest: Optional[str], kept: list[tuple[str, dict]], metric: str, mode: str, run_dir: str
) -> dict:
    """result.json: ``last`` the run's last reported metrics, ``latest`` its latest checkpoint, ``kept`` the
    checkpoints retained with the metrics each was reported with."""
    best_ckpt = None
    best_metrics: dict = {}
    ranked = [(c, m) for c, m in kept if m.get(metric) is not None and not m.get("recovery")]
    if ranked:
        # Ties go to the later epoch, as in the worker's best tracking and Ray's retention.
        sign = -1 if mode == "min" else 1
        best_ckpt, best_metrics = max(ranked, key=lambda cm: (sign * cm[1][metric], cm[1].get("epoch", -1)))
    return dict(
        eval_metric=metric,
        mode=mode,
        best_value=best_metrics.get(metric, last.get("best_metric")),
        best_epoch=best_metrics.get("epoch", last.get("best_epoch")),
        last_metrics=last,
        latest_checkpoint=latest,
        best_checkpoint=best_ckpt,
        run_dir=run_dir,
    )


def write_result(run_dir: str | Path, payload: dict) -> str:
    path = join(run_dir, RESULT_FILE)
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path


def read_result(run_dir: str | Path) -> Optional[dict]:
    """A run's result.json, None where it has none yet."""
    text = read_text(join(run_dir, RESULT_FILE))
    return json.loads(text) if text else None


def trial_run_dir(search_dir: str, trial_id: str) -> str:
    """Where a trial's Ray Train run lives: <search dir>/trials/trial-<id> (a path or a URI)."""
    return join(join(search_dir, "trials"), f"trial-{trial_id}")
