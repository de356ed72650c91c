"""Training loss and mixup/cutmix, chosen the way timm's train.py chooses them."""

from __future__ import annotations

from typing import Optional

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from raytrain_cls.core.config import Config


def mixup_active(cfg: Config) -> bool:
    a = cfg.aug
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


def mixup_kwargs(cfg: Config, num_classes: int) -> dict:
    a = cfg.aug
    return dict(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        cutmix_minmax=a.cutmix_minmax,
        prob=a.mixup_prob,
        switch_prob=a.mixup_switch_prob,
        mode=a.mixup_mode,
        label_smoothing=cfg.loss.smoothing,
        num_classes=num_classes,
    )


def build_mixup(cfg: Config, num_classes: int) -> Optional[Mixup]:
    """The batch mixer the training loop applies; None with --naflex-loader, whose loader mixes (NaFlexMixup)."""
    return Mixup(**mixup_kwargs(cfg, num_classes)) if mixup_active(cfg) and not cfg.data.naflex_loader else None


def build_train_loss(cfg: Config) -> torch.nn.Module:
    """Soft-target CE under mixup (smoothing is folded into the mixed targets), else smoothed CE, or BCE."""
    smoothing = cfg.loss.smoothing
    if cfg.loss.jsd_loss:
        return JsdCrossEntropy(num_splits=cfg.aug.aug_splits, smoothing=smoothing)
    if cfg.loss.bce_loss:
        # With mixup the targets are already smoothed; BCE must not smooth them again.
        return BinaryCrossEntropy(
            smoothing=0.0 if mixup_active(cfg) else smoothing,
            target_threshold=cfg.loss.bce_target_thresh,
            sum_classes=cfg.loss.bce_sum,
            pos_weight=cfg.loss.bce_pos_weight,
        )
    if mixup_active(cfg):
        return SoftTargetCrossEntropy()
    if smoothing:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()
