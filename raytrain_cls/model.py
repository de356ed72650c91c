"""Model construction through timm's factory: create_model kwargs, channels_last, EMA."""
from __future__ import annotations

import difflib
from typing import Optional

import timm
import torch
from timm.utils import ModelEmaV3

from .config import Config, ConfigError


def model_kwargs(cfg: Config, num_classes: int) -> dict:
    """timm.create_model keyword arguments for this run (never downloads: pretrained weights are a local file)."""
    m = cfg.model
    kwargs = dict(num_classes=num_classes, drop_rate=m.drop, **m.model_kwargs)
    if m.drop_path is not None:
        kwargs["drop_path_rate"] = m.drop_path
    if m.gp is not None:
        kwargs["global_pool"] = m.gp
    in_chans = m.input_size[0] if m.input_size else m.in_chans
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if m.pretrained_path:
        # timm loads the file (weights_only) and drops a classifier whose class count differs.
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=m.pretrained_path))
    return kwargs


def check_model_name(name: str) -> None:
    """Fail on a model name timm does not know, suggesting the closest one."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError("model.model", name, f"not a timm model{hint}")


def pretrained_cfg_of(cfg: Config, num_classes: int) -> dict:
    """The model's default data settings (input size, mean, std, crop) without allocating its weights."""
    check_model_name(cfg.model.model)
    kwargs = {k: v for k, v in model_kwargs(cfg, num_classes).items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    with torch.device("meta"):
        model = timm.create_model(cfg.model.model, pretrained=False, **kwargs)
    return dict(model.pretrained_cfg)


def build_model(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    model = timm.create_model(cfg.model.model, **model_kwargs(cfg, num_classes))
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_ema(cfg: Config, model: torch.nn.Module) -> Optional[ModelEmaV3]:
    e = cfg.ema
    if not e.model_ema:
        return None
    return ModelEmaV3(model, decay=e.model_ema_decay, use_warmup=e.model_ema_warmup,
                      device=torch.device("cpu") if e.model_ema_force_cpu else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP (and torch.compile) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
