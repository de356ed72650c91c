"""timm's transforms, configured from the run config through small kwargs adapters."""
from __future__ import annotations

from typing import Callable

from timm.data import create_transform

from ..config import Config


def data_config_kwargs(cfg: Config) -> dict:
    """The keys timm.data.resolve_data_config reads, from the model group."""
    m = cfg.model
    return dict(input_size=m.input_size, img_size=m.img_size, in_chans=m.in_chans, crop_pct=m.crop_pct,
                mean=m.mean, std=m.std, interpolation=m.interpolation or None)


def transform_kwargs(cfg: Config, data_config: dict, is_training: bool) -> dict:
    kwargs = dict(input_size=tuple(data_config["input_size"]), is_training=is_training,
                  mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                  crop_pct=data_config["crop_pct"], crop_mode=data_config.get("crop_mode"),
                  interpolation=data_config["interpolation"])
    if is_training:
        a = cfg.aug
        kwargs.update(no_aug=a.no_aug, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip, vflip=a.vflip,
                      color_jitter=a.color_jitter, auto_augment=a.aa, interpolation=a.train_interpolation,
                      re_prob=a.reprob, re_mode=a.remode, re_count=a.recount)
    return kwargs


def build_transform(cfg: Config, data_config: dict, is_training: bool) -> Callable:
    return create_transform(**transform_kwargs(cfg, data_config, is_training))
