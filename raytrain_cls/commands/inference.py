"""`raytrain-cls eval` (timm's validate.py) and `raytrain-cls predict`, in-process on one device.

Both take a training checkpoint directory (meta.json + model.safetensors) or an exported model directory
(config.json + model.safetensors, from `raytrain-cls export`). Nothing here unpickles anything.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.data import create_transform

from raytrain_cls.commands.export import CONFIG_JSON, read_exported
from raytrain_cls.core.config import DEFAULT_MAX_IMAGE_PIXELS, Config
from raytrain_cls.core.engine import to_device, tta_logits
from raytrain_cls.core.model import architecture_kwargs, split_bn
from raytrain_cls.core.state import (
    EMA_FILE,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    load_weights,
    verified_meta,
)
from raytrain_cls.core.storage import atomic_write_text, local_dir
from raytrain_cls.data.loader import SkippingLoader, TransformedDataset, collate_skipping_bad, image_mode
from raytrain_cls.data.naflex import NaFlexEvalCollate, naflex_eval_transform
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.sampler import ShardSampler
from raytrain_cls.data.shards import MANIFEST, ShardError, ShardReader, read_manifest
from raytrain_cls.data.sources import IMAGE_EXTENSIONS, BadImageError, DataError, decode_image
from raytrain_cls.run.driver import connect


@dataclass
class LoadedModel:
    model: torch.nn.Module
    data_config: dict  # input_size, interpolation, mean, std, crop_pct, crop_mode
    classes: list
    config: Optional[Config]  # the training config, for checkpoints (None for an exported model)
    # trained with --naflex-loader: (patch size, validation length, channels-first patches)
    naflex: Optional[tuple[int, int, bool]] = None


def load_model(path: str | Path, use_ema: bool = False, device: str = "cpu") -> LoadedModel:
    """A checkpoint directory or an exported model (local, or under a URI such as s3://, fetched first)."""
    with local_dir(path) as local:
        return _load_model(local, use_ema, device)


def _load_model(path: Path, use_ema: bool, device: str) -> LoadedModel:
    weights = path / (EMA_FILE if use_ema else MODEL_FILE)
    if use_ema and not weights.is_file():
        raise CheckpointError(f"{path} has no EMA weights ({EMA_FILE}); drop --use-ema")
    if (path / META_FILE).is_file():
        cfg = Config.from_dict(verified_meta(path)["config"])
        r = cfg.resolved
        model = _create_model(cfg.model.model, **architecture_kwargs(cfg, r.num_classes))
        model = split_bn(cfg, model)  # so a --split-bn checkpoint loads; evaluation uses the main statistics
        load_weights(model, weights)
        data_config, classes = dict(r.data_config), list(r.classes or [])
        naflex = (
            (r.naflex_patch_size, cfg.data.naflex_max_seq_len, cfg.data.naflex_patchify_channels_first)
            if cfg.data.naflex_loader
            else None
        )
    elif (path / CONFIG_JSON).is_file():
        info = read_exported(path)
        model = _create_model(info["architecture"], num_classes=info["num_classes"], **info.get("model_args", {}))
        load_weights(model, weights)  # strict, refused by name when it does not fit (plain safetensors load too)
        data_config, classes, cfg = dict(info["pretrained_cfg"]), list(info.get("label_names") or []), None
        naflex = None  # an export carries no NaFlex settings: it is evaluated on images
    else:
        raise CheckpointError(f"{path} is neither a checkpoint ({META_FILE}) nor an exported model (config.json)")
    model.to(device).eval()
    return LoadedModel(model, data_config, classes, cfg, naflex)


def _create_model(name: str, **kwargs) -> torch.nn.Module:
    """The model a checkpoint or an export records; one this timm cannot build is the checkpoint's problem, named."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # unknown name, or arguments this timm version does not take
        raise CheckpointError(
            f"this timm ({timm.__version__}) cannot build the model the checkpoint records, "
            f"{name}: {type(e).__name__}: {e}"
        ) from None


def eval_transform(data_config: dict, crop_pct: Optional[float] = None):
    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=False,
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=crop_pct or data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode", "center"),
    )


def eval_input(loaded: LoadedModel, crop_pct: Optional[float] = None):
    """(transform, collate) of a model's validation input: the run's patch sequences for a NaFlex model."""
    if loaded.naflex:
        return naflex_eval_transform(loaded.data_config, *loaded.naflex), NaFlexEvalCollate(loaded.naflex[1])
    return eval_transform(loaded.data_config, crop_pct), collate_skipping_bad


def evaluate_checkpoint(
    path: str,
    cfg_overrides: Optional[dict] = None,
    use_ema: bool = False,
    tta: int = 0,
    crop_pct: Optional[float] = None,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "cpu",
    ray_workers: int = 0,
) -> dict:
    """Loss, top-1, top-5 (percent) and per-class accuracy on the checkpoint's validation split (or the data set
    the overrides name). ``ray_workers`` > 0: the validation set is split across that many Ray tasks (rank r
    takes samples r, r + n, ...; on GPUs when the cluster has them) and their sums are added, so every sample
    still counts once; the checkpoint and the data must be readable from the nodes (shared storage)."""
    args = (str(path), cfg_overrides, use_ema, tta, crop_pct, batch_size, workers)
    if ray_workers > 0:
        sums = _sums_on_ray(args, ray_workers)
    else:
        sums = [shard_sums(*args, device=device)]
    return _results(str(path), use_ema, tta, sums)


def shard_sums(
    path: str,
    cfg_overrides: Optional[dict],
    use_ema: bool,
    tta: int,
    crop_pct: Optional[float],
    batch_size: int,
    workers: int,
    device: str = "cpu",
    rank: int = 0,
    world: int = 1,
) -> dict:
    """One shard's loss sum, top-5 hits, per-class top-1 hits and counts, and skipped images."""
    loaded = load_model(path, use_ema, device)
    cfg = loaded.config or Config()
    if cfg_overrides:
        cfg.update(cfg_overrides)
    cfg.validate()
    source = build_source(cfg)
    if loaded.classes and source.classes != loaded.classes:
        raise DataError(
            f"the data set's classes {source.classes[:5]}... differ from the model's "
            f"{loaded.classes[:5]}...: evaluate on data labelled like the training set"
        )
    if loaded.naflex and tta:
        raise DataError("--tta flips images; a NaFlex model is evaluated on patch sequences: drop --tta")
    transform, collate = eval_input(loaded, crop_pct)
    dataset = TransformedDataset(source.val, transform, image_mode(loaded.data_config))
    # Unreadable images are skipped and counted, as in training: every readable sample counted once.
    loader = SkippingLoader(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            sampler=ShardSampler(len(dataset), rank, world),
        ),
        fill=False,
    )
    n_classes = len(source.classes)
    hits1 = torch.zeros(n_classes, dtype=torch.long)
    counts = torch.zeros(n_classes, dtype=torch.long)
    loss_sum, top5 = 0.0, 0
    for x, y in loader:
        logits = tta_logits(loaded.model, to_device(x, y, device, False)[0], tta).cpu()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        top5 += int(hit.any(dim=1).sum())
        counts += torch.bincount(y, minlength=n_classes)
        hits1 += torch.bincount(y[hit[:, 0]], minlength=n_classes)
    return dict(
        classes=list(source.classes),
        loss_sum=loss_sum,
        top5=top5,
        hits1=hits1.tolist(),
        counts=counts.tolist(),
        skipped=loader.bad.count,
        skipped_examples=loader.bad.examples,
    )


def _sums_on_ray(args: tuple, world: int) -> list[dict]:
    import ray

    gpus = connect(for_ray_train=False).get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(shard_sums)
    device = "cuda" if gpus else "cpu"
    return ray.get([task.remote(*args, device=device, rank=r, world=world) for r in range(world)])


def _results(path: str, use_ema: bool, tta: int, sums: list[dict]) -> dict:
    classes = sums[0]["classes"]
    hits1 = [sum(s["hits1"][i] for s in sums) for i in range(len(classes))]
    counts = [sum(s["counts"][i] for s in sums) for i in range(len(classes))]
    total = sum(counts)
    per_class = {
        name: dict(top1=100.0 * hits1[i] / max(counts[i], 1), samples=counts[i]) for i, name in enumerate(classes)
    }
    return dict(
        checkpoint=path,
        use_ema=use_ema,
        tta=tta,
        samples=total,
        loss=sum(s["loss_sum"] for s in sums) / max(total, 1),
        top1=100.0 * sum(hits1) / max(total, 1),
        top5=100.0 * sum(s["top5"] for s in sums) / max(total, 1),
        shards=len(sums),
        skipped=sum(s["skipped"] for s in sums),
        skipped_examples=[e for s in sums for e in s["skipped_examples"]][:10],
        per_class=per_class,
    )


def write_eval_results(results: dict, out: str) -> None:
    if out.endswith(".csv"):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["class", "top1", "samples"])
        w.writerow(["__all__", results["top1"], results["samples"]])
        for name, m in results["per_class"].items():
            w.writerow([name, m["top1"], m["samples"]])
        atomic_write_text(out, buf.getvalue())
    else:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")


@dataclass
class PredictInput:
    """One image to classify: where it came from, and how to get its bytes."""

    path: str
    read: Callable[[], bytes]


def find_images(inputs: Sequence[str]) -> list[PredictInput]:
    """Image files, folders of them (searched recursively) and prepared Parquet shard folders or URIs (every row
    of every split, named by the row's original path)."""
    found: list[PredictInput] = []
    for item in inputs:
        p = Path(item)
        if "://" in item or (p.is_dir() and (p / MANIFEST).is_file()):
            found += _shard_rows(item)
        elif p.is_dir():
            found += [
                PredictInput(str(f), f.read_bytes) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
            ]
        elif p.is_file():
            found.append(PredictInput(str(p), p.read_bytes))
        else:
            raise DataError(f"{item}: no such image or folder")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return found


def _shard_rows(root: str) -> list[PredictInput]:
    try:
        manifest = read_manifest(root)
    except ShardError as e:
        raise DataError(str(e)) from None
    rows = []
    for split in manifest.splits.values():
        reader = ShardReader(root, split, cache_shards=2)
        for i in range(len(reader)):
            shard, offset = reader.locate(i)
            rows.append(PredictInput(f"{root}/{split.shards[shard].file}#{offset}", lambda r=reader, i=i: r.row(i)[0]))
    return rows


@torch.no_grad()
def predict(
    path: str,
    inputs: Sequence[str],
    topk: int = 5,
    batch_size: int = 64,
    use_ema: bool = False,
    device: Optional[str] = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[dict]:
    """Top-k classes and probabilities per image. Unreadable images get an error row instead of a guess."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(path, use_ema, device)
    mode = image_mode(loaded.data_config)
    transform, collate = eval_input(loaded)
    items = find_images(inputs)
    rows: list[dict] = []
    for start in range(0, len(items), batch_size):
        chunk = [dict(path=item.path) for item in items[start : start + batch_size]]  # output keeps input order
        batch, slots = [], []
        for row, item in zip(chunk, items[start : start + batch_size]):
            try:
                try:
                    data = item.read()
                except OSError as e:
                    raise BadImageError(item.path, f"{type(e).__name__}: {e}") from None
                img = decode_image(data, item.path, max_pixels)
                batch.append(transform(img.convert(mode) if img.mode != mode else img))
                slots.append(row)
            except BadImageError as e:
                row["error"] = e.reason
        if batch:
            x = collate([(b, 0) for b in batch])[0]  # (inputs, dummy targets, no bad samples)
            probs = loaded.model(to_device(x, torch.empty(0), device, False)[0]).float().softmax(dim=1).cpu()
            values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
            for row, v, idx in zip(slots, values.tolist(), indices.tolist()):
                row.update(classes=[loaded.classes[i] if i < len(loaded.classes) else str(i) for i in idx], probs=v)
        rows += chunk
    return rows


def format_predictions(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    k = max((len(r.get("classes", [])) for r in rows), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", *[c for i in range(1, k + 1) for c in (f"class{i}", f"prob{i}")], "error"])
    for r in rows:
        pairs = [x for c, p in zip(r.get("classes", []), r.get("probs", [])) for x in (c, f"{p:.6f}")]
        w.writerow([r["path"], *pairs, *[""] * (2 * k - len(pairs)), r.get("error", "")])
    return buf.getvalue()
