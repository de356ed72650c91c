"""timm's transforms, configured from the run config through small kwargs adapters."""

from __future__ import annotations

from collections.abc import Callable

from timm.data import create_transform

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.data.pillow_compat import install_posterize_fix

install_posterize_fix()  # before any transform is built: timm binds the op when it builds an AugmentOp


def data_config_kwargs(cfg: Config) -> dict:
    """The keys timm.data.resolve_data_config reads, from the model group."""
    m = cfg.model
    return dict(
        input_size=m.input_size,
        img_size=m.img_size,
        in_chans=m.in_chans,
        crop_pct=m.crop_pct,
        mean=m.mean,
        std=m.std,
        interpolation=m.interpolation or None,
    )


def transform_kwargs(cfg: Config, data_config: dict, is_training: bool) -> dict:
    kwargs = dict(
        input_size=tuple(data_config["input_size"]),
        is_training=is_training,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
        interpolation=data_config["interpolation"],
    )
    if is_training:
        a = cfg.aug
        kwargs.update(
            no_aug=a.no_aug,
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            vflip=a.vflip,
            color_jitter=a.color_jitter,
            auto_augment=a.aa,
            interpolation=a.train_interpolation,
            re_prob=a.reprob,
            re_mode=a.remode,
            re_count=a.recount,
        )
        # timm 2024 options, passed only when used (older timm releases lack the arguments)
        optional = dict(
            train_crop_mode=a.train_crop_mode,
            color_jitter_prob=a.color_jitter_prob,
            grayscale_prob=a.grayscale_prob or None,
            gaussian_blur_prob=a.gaussian_blur_prob or None,
        )
        kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def build_transform(cfg: Config, data_config: dict, is_training: bool) -> Callable:
    if is_training and cfg.aug.aug_splits >= 2:
        return build_aug_splits(cfg, data_config)
    return create_transform(**transform_kwargs(cfg, data_config, is_training))


def check_transforms(cfg: Config, data_config: dict) -> None:
    """Build the training and validation transforms once, on the driver: an option timm's transform factory refuses
    (an --aa policy it does not know, ...) fails here with its key instead of in every worker's first batch."""
    for is_training in (True, False):
        try:
            build_transform(cfg, data_config, is_training)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            key, value = ("aug.aa", cfg.aug.aa) if cfg.aug.aa and is_training else ("data", "transforms")
            reason = str(e).strip() or type(e).__name__
            which = "training" if is_training else "validation"
            raise ConfigError(key, value, f"timm cannot build the {which} transforms: {reason}") from None


class AugSplits:
    """timm's AugMix splits for one image: the clean view (base crop/flip + normalise) and ``num_splits - 1``
    views with the secondary augmentation (AugMix, RandAugment, jitter) on top of the same base crop. Random
    erasing runs per view, skipping the clean one with --resplit (what timm's prefetcher does for a batch)."""

    def __init__(self, primary: Callable, secondary: Callable, final: Callable, num_splits: int, erase, resplit: bool):
        self.primary, self.secondary, self.final = primary, secondary, final
        self.num_splits, self.erase, self.resplit = num_splits, erase, resplit

    def __call__(self, img):
        base = self.primary(img)
        views = [self.final(base)] + [self.final(self.secondary(base)) for _ in range(self.num_splits - 1)]
        if self.erase is not None:
            views = [v if (i == 0 and self.resplit) else self.erase(v) for i, v in enumerate(views)]
        return tuple(views)


def build_aug_splits(cfg: Config, data_config: dict) -> AugSplits:
    from timm.data.random_erasing import RandomErasing

    a = cfg.aug
    kwargs = dict(transform_kwargs(cfg, data_config, True), separate=True, re_prob=0.0)
    primary, secondary, final = create_transform(**kwargs)
    erase = RandomErasing(a.reprob, mode=a.remode, max_count=a.recount, device="cpu") if a.reprob > 0 else None
    return AugSplits(primary, secondary, final, a.aug_splits, erase, a.resplit)
