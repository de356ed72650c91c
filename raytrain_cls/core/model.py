"""Model construction through timm's factory: create_model kwargs, channels_last, EMA."""

from __future__ import annotations

import difflib
from typing import Optional

import timm
import torch
from timm.utils import ModelEmaV3

from raytrain_cls.core.config import Config, ConfigError


def model_kwargs(cfg: Config, num_classes: int) -> dict:
    """timm.create_model keyword arguments for this run (never downloads: pretrained weights are a local file)."""
    m = cfg.model
    kwargs = dict(num_classes=num_classes, drop_rate=m.drop, **m.model_kwargs)
    if m.drop_path is not None:
        kwargs["drop_path_rate"] = m.drop_path
    if m.gp is not None:
        kwargs["global_pool"] = m.gp
    if m.drop_block is not None:
        kwargs["drop_block_rate"] = m.drop_block
    in_chans = m.input_size[0] if m.input_size else m.in_chans
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if m.pretrained_path:
        # timm loads the file (weights_only) and drops a classifier whose class count differs.
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=m.pretrained_path))
    return kwargs


def architecture_kwargs(cfg: Config, num_classes: int) -> dict:
    """model_kwargs without the pretrained-weights loading: rebuild the architecture, then load our own weights."""
    return {
        k: v for k, v in model_kwargs(cfg, num_classes).items() if k not in ("pretrained", "pretrained_cfg_overlay")
    }


def check_model_name(name: str, key: str = "model.model") -> None:
    """Fail on a model name timm does not know, suggesting the closest one."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(key, name, f"not a timm model{hint}")


def meta_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The run's architecture on the meta device (no weights allocated): its default data settings
    (pretrained_cfg) and its structure, for checks on the driver."""
    check_model_name(cfg.model.model)
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.model.model, pretrained=False, **architecture_kwargs(cfg, num_classes))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # an argument the model does not take
        key = "model.model_kwargs" if cfg.model.model_kwargs else "model.model"
        value = cfg.model.model_kwargs or cfg.model.model
        raise ConfigError(
            key, value, f"timm cannot build {cfg.model.model} with this run's arguments: {type(e).__name__}: {e}"
        ) from None


def check_weights_file(key: str, path: str) -> None:
    """A local weights file (timm's .safetensors, or a .pth/.pt state dict) that the workers will load is
    readable, checked on the driver: its header for safetensors, a memory map under torch's weights-only loader
    otherwise (nothing is read into memory that the map does not touch)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a weights file, truncated, or a pickle that is more than tensors
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError(key, path, f"not a readable weights file ({type(e).__name__}: {reason})") from None


def set_bn(model: torch.nn.Module, momentum: Optional[float], eps: Optional[float]) -> int:
    """timm's --bn-momentum/--bn-eps, applied to every BatchNorm layer; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                module.momentum = momentum
            if eps is not None:
                module.eps = eps
            changed += 1
    return changed


def init_head(model: torch.nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    """timm's --head-init-scale / --head-init-bias on the classifier (nothing to do for a model without one)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Module) or getattr(head, "weight", None) is None:
        return
    with torch.no_grad():
        if scale is not None:
            head.weight.mul_(scale)
            if head.bias is not None:
                head.bias.mul_(scale)
        if bias is not None and head.bias is not None:
            head.bias.fill_(bias)


def model_dtype(cfg: Config) -> Optional[torch.dtype]:
    """timm's --model-dtype: the weights' dtype (None: leave timm's float32)."""
    name = cfg.precision.model_dtype
    return getattr(torch, name) if name else None


def split_bn(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """timm's --split-bn: BatchNorm layers with an auxiliary set of statistics per augmented split (evaluation
    uses the main one). Also applied when a checkpoint of such a model is rebuilt, so its weights load."""
    if not cfg.model.split_bn:
        return model
    from timm.layers import convert_splitbn_model

    return convert_splitbn_model(model, max(cfg.aug.aug_splits, 2))


def build_model(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    m = cfg.model
    if m.fast_norm:
        from timm.layers import set_fast_norm

        set_fast_norm(True)  # read when the norm layers are created, so before create_model
    model = timm.create_model(m.model, **model_kwargs(cfg, num_classes))
    set_bn(model, m.bn_momentum, m.bn_eps)
    init_head(model, m.head_init_scale, m.head_init_bias)
    model = split_bn(cfg, model)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device=device, dtype=model_dtype(cfg))
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    if m.fuser:
        from timm.utils import set_jit_fuser

        set_jit_fuser(m.fuser)  # process-wide, as in timm: picks the fuser TorchScript's profiling executor uses
    if m.torchscript:
        model = torch.jit.script(model)
    return model


def build_ema(cfg: Config, model: torch.nn.Module) -> Optional[ModelEmaV3]:
    e = cfg.ema
    if not e.model_ema:
        return None
    return ModelEmaV3(
        model,
        decay=e.model_ema_decay,
        use_warmup=e.model_ema_warmup,
        device=torch.device("cpu") if e.model_ema_force_cpu else None,
    )


def prepare_for_workers(cfg: Config, model: torch.nn.Module, world: int) -> torch.nn.Module:
    """Sync-BN conversion, done on the bare model after EMA/optimizer creation would be too late: call it before."""
    if cfg.model.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def compile_model(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """timm's --torchcompile [backend] --torchcompile-mode; the compiled module shares the bare model's weights."""
    if not cfg.model.torchcompile:
        return model
    return torch.compile(model, backend=cfg.model.torchcompile, mode=cfg.model.torchcompile_mode)
