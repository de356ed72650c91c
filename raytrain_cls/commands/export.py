"""`raytrain-cls export CHECKPOINT OUT_DIR`: a trained model as plain safetensors plus what rebuilds it.

The output needs neither this package nor Ray:

    cfg = json.load(open("OUT_DIR/config.json"))
    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"], **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file("OUT_DIR/model.safetensors"))
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save

from raytrain_cls.core.config import Config
from raytrain_cls.core.model import architecture_kwargs, split_bn
from raytrain_cls.core.state import EMA_FILE, MODEL_FILE, load_weights, read_meta
from raytrain_cls.core.storage import atomic_write_bytes, atomic_write_text, is_uri, local_dir

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
    source = str(checkpoint) if is_uri(checkpoint) else str(Path(checkpoint).resolve())
    with local_dir(checkpoint) as src:
        return _export(src, Path(out_dir), source)


def _export(src: Path, out: Path, source: str) -> dict:
    meta = read_meta(src)
    cfg = Config.from_dict(meta["config"])
    r = cfg.resolved
    num_classes = r.num_classes
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (MODEL_FILE, EMA_FILE):
        if not (src / name).is_file():
            continue
        model, kwargs = _rebuild(cfg, num_classes)
        model = split_bn(cfg, model)
        load_weights(model, src / name)  # strict: proves the weights rebuild the architecture before we write
        _save_plain(model, out / name)
        written.append(name)
    info = dict(
        architecture=cfg.model.model,
        num_classes=num_classes,
        model_args=kwargs,
        pretrained_cfg=dict(r.data_config),
        label_names=r.classes,
        weights=written,
        epoch=meta.get("epoch"),
        metrics=meta.get("metrics", {}),
        source_checkpoint=source,
    )
    atomic_write_text(out / CONFIG_JSON, json.dumps(info, indent=2, default=str) + "\n")
    return info
