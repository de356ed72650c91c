"""`raytrain-cls export CHECKPOINT OUT_DIR`: a trained model as plain safetensors plus what rebuilds it.

The output needs neither this package nor Ray:

    cfg = json.load(open("OUT_DIR/config.json"))
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file("OUT_DIR/model.safetensors"))

config.json also records the sha256 of each weights file, which `eval` and `predict` verify before loading.
Nothing is written until the checkpoint has been verified and its weights have rebuilt the architecture; a write
that fails removes what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.model import architecture_kwargs, split_bn
from raytrain_cls.core.state import (
    EMA_FILE,
    MODEL_FILE,
    CheckpointError,
    check_recorded_files,
    file_digest,
    load_weights,
    verified_meta,
)
from raytrain_cls.core.storage import atomic_write_bytes, atomic_write_text, is_uri, local_dir, unwritable_reason

CONFIG_JSON = "config.json"


def _rebuild(cfg: Config, num_classes: int) -> tuple[torch.nn.Module, dict]:
    kwargs = {k: v for k, v in architecture_kwargs(cfg, num_classes).items() if k != "num_classes"}
    return timm.create_model(cfg.model.model, pretrained=False, num_classes=num_classes, **kwargs), kwargs


def _save_plain(module: torch.nn.Module, path: Path) -> None:
    """Every state-dict entry as its own tensor (tied weights copied), written to a temp file then renamed.
    Split-BN's auxiliary statistics are training-only and left out, so timm's plain architecture loads it."""
    tensors = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items() if ".aux_bn." not in k
    }
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict:
    """Write OUT_DIR/model.safetensors (+ ema.safetensors) and config.json; returns the config.json content.
    CHECKPOINT may be under a URI (s3://): it is fetched first."""
    reason = unwritable_reason(out_dir)
    if reason:
        raise ConfigError("out_dir", str(out_dir), f"cannot be written: {reason}")
    source = str(checkpoint) if is_uri(checkpoint) else str(Path(checkpoint).resolve())
    with local_dir(checkpoint) as src:
        return _export(src, Path(out_dir), source)


def _export(src: Path, out: Path, source: str) -> dict:
    meta = verified_meta(src)
    cfg = Config.from_dict(meta["config"])
    r = cfg.resolved
    if not (src / MODEL_FILE).is_file():
        raise CheckpointError(f"{src} has no {MODEL_FILE}: there are no weights to export")
    models = {}
    for name in (MODEL_FILE, EMA_FILE):
        if (src / name).is_file():
            model, kwargs = _rebuild(cfg, r.num_classes)
            models[name] = split_bn(cfg, model)
            load_weights(models[name], src / name)  # strict: proves the weights rebuild the architecture
    info = dict(
        architecture=cfg.model.model,
        num_classes=r.num_classes,
        model_args=kwargs,
        pretrained_cfg=dict(r.data_config),
        label_names=r.classes,
        weights=list(models),
        epoch=meta.get("epoch"),
        metrics=meta.get("metrics", {}),
        source_checkpoint=source,
    )
    _write_all(out, models, info)
    return info


def _write_all(out: Path, models: dict, info: dict) -> None:
    """The weights, then config.json with their checksums; on failure (disk full) what was written goes again,
    and the folder too when this export created it: a failed export leaves nothing half-made."""
    created = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            written.append(out / name)
            _save_plain(model, out / name)
        info["files"] = {name: file_digest(out / name) for name in models}
        written.append(out / CONFIG_JSON)
        atomic_write_text(out / CONFIG_JSON, json.dumps(info, indent=2, default=str) + "\n")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def read_exported(path: Path) -> dict:
    """An exported model's config.json, checked: the keys that rebuild the model, and each weights file against
    the sha256 recorded for it (exports written before checksums load unverified)."""
    try:
        info = json.loads((path / CONFIG_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_JSON} is not a readable export ({e})") from None
    missing = [
        k for k in ("architecture", "num_classes", "pretrained_cfg") if not isinstance(info, dict) or k not in info
    ]
    if missing:
        raise CheckpointError(f"{path / CONFIG_JSON} is not an export of raytrain-cls (missing {', '.join(missing)})")
    check_recorded_files(path, info.get("files") or {}, "export", CONFIG_JSON)
    return info
