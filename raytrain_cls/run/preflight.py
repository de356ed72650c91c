"""The checks before Ray: the data set read, the model built on the meta device, the transforms, the teacher and
the weights a run starts from, so that an unknown model, a bad model argument or a data set that cannot be read
fails before any cluster start-up. What they find (class list, sample counts, data config, schedule length) is the
run's RunFacts (core/facts.py), which driver.resolve records.

The one module of the driver side that needs timm (and torch) to check a config: the driver imports it where a run
is checked, so that a Tune trial handed its search's facts never loads timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.distill import teacher_weights_file
from raytrain_cls.core.elastic import check_elastic_range
from raytrain_cls.core.facts import RunFacts
from raytrain_cls.core.model import check_model_name, check_weights_file, meta_model, split_bn
from raytrain_cls.core.optim import resolve_num_epochs
from raytrain_cls.core.size_schedule import training_batch
from raytrain_cls.core.state import MODEL_FILE, check_architecture
from raytrain_cls.core.storage import is_uri, join
from raytrain_cls.data import build_source
from raytrain_cls.data.transforms import check_transforms, data_config_kwargs


@dataclass
class Preflight:
    """What the checks found: the run's facts, and the architecture they built (on the meta device: structure and
    defaults, no weights) for the checks of the weights a run starts from."""

    facts: RunFacts
    architecture: torch.nn.Module


def resolve_data_config(cfg: Config, num_classes: int, pretrained_cfg: Optional[dict] = None) -> dict:
    """timm's resolve_data_config from the model's defaults and the user's overrides, as plain lists."""
    from timm.data import resolve_data_config as timm_resolve

    if pretrained_cfg is None:
        pretrained_cfg = meta_model(cfg, num_classes).pretrained_cfg
    dc = timm_resolve(args=data_config_kwargs(cfg), pretrained_cfg=dict(pretrained_cfg))
    if cfg.model.in_chans and not cfg.model.input_size:
        # timm takes the channel count from the model's default input size unless --img-size is given too;
        # --in-chans alone must still size the data for the model it builds
        dc["input_size"] = (cfg.model.in_chans, *dc["input_size"][1:])
    chans = dc["input_size"][0]
    mean, std = list(dc["mean"]), list(dc["std"])
    if len(mean) != chans:  # e.g. a grey (in_chans=1) model with ImageNet's RGB statistics: one averaged value
        mean = [sum(mean) / len(mean)] * chans if len(mean) != 1 else mean * chans
        std = [sum(std) / len(std)] * chans if len(std) != 1 else std * chans
    return dict(
        input_size=list(dc["input_size"]),
        interpolation=dc["interpolation"],
        mean=mean,
        std=std,
        crop_pct=float(dc["crop_pct"]),
        crop_mode=dc.get("crop_mode", "center"),
    )


def preflight(cfg: Config) -> Preflight:
    """Build the data source and the model's architecture (on the meta device), check what the run would fail on
    in every worker, and find the run's facts; raise ConfigError / DataError."""
    source = build_source(cfg)
    num_classes = cfg.model.num_classes or source.num_classes
    if num_classes < source.num_classes:
        raise ConfigError("model.num_classes", num_classes, f"the data set has {source.num_classes} classes")
    key, batch = training_batch(cfg)
    if cfg.scaling.worker_range():
        check_elastic_range(cfg, even_batches=cfg.aug.mixing and cfg.aug.mixup_mode in ("batch", "pair"))
    if batch > len(source.train):  # with more workers, resolve() checks the product
        raise ConfigError(
            f"data.{key}", getattr(cfg.data, key), f"is more than the {len(source.train)} training samples"
        )
    if cfg.model.pretrained_path:
        check_weights_file("model.pretrained_path", cfg.model.pretrained_path)
    architecture = meta_model(cfg, num_classes)
    if (
        cfg.loss.kd_model_name
        and cfg.loss.kd_distill_type == "token"
        and not hasattr(architecture, "set_distilled_training")
    ):
        raise ConfigError(
            "loss.kd_distill_type",
            "token",
            f"{cfg.model.model} has no distillation token: use a "
            "*_distilled model (e.g. deit_tiny_distilled_patch16_224), or --kd-distill-type logit",
        )
    data_config = resolve_data_config(cfg, num_classes, architecture.pretrained_cfg)
    extra = {}
    if cfg.data.naflex_loader:
        extra["naflex_patch_size"] = naflex_model_patch_size(cfg, architecture)
    else:  # NaFlex inputs have no fixed image size
        check_input_size(cfg, architecture, data_config["input_size"])
        check_transforms(cfg, data_config)
    if cfg.loss.kd_model_name:
        check_teacher(cfg, num_classes)
    chans = data_config["input_size"][0]
    if cfg.data.input_img_mode and chans != {"RGB": 3, "L": 1}[cfg.data.input_img_mode]:
        raise ConfigError(
            "data.input_img_mode",
            cfg.data.input_img_mode,
            f"the model takes {chans}-channel input (set --in-chans to match, or drop --input-img-mode)",
        )
    facts = RunFacts(
        num_classes=num_classes,
        classes=list(source.classes),
        train_samples=len(source.train),
        val_samples=len(source.val),
        data_config=data_config,
        num_epochs=resolve_num_epochs(cfg),
        extra=extra,
    )
    return Preflight(facts, architecture)


def check_teacher(cfg: Config, num_classes: int) -> None:
    """The distillation teacher's weights file is readable and, as safetensors, fits the teacher's architecture."""
    lc = cfg.loss
    path = teacher_weights_file(lc.kd_model_path)
    if path.suffix != ".safetensors":
        check_weights_file("loss.kd_model_path", str(path))
        return
    check_model_name(lc.kd_model_name, key="loss.kd_model_name")
    in_chans = (cfg.model.input_size[0] if cfg.model.input_size else cfg.model.in_chans) or 3
    with torch.device("meta"):  # as core.distill.build_teacher builds it, without weights
        teacher = timm.create_model(lc.kd_model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    check_architecture(teacher, path)


def check_start_weights(cfg: Config, architecture: torch.nn.Module, start_from: Optional[str]) -> None:
    """The weights a run starts from (--resume CHECKPOINT, --initial-checkpoint) fit the architecture it builds,
    read from the files' headers on the driver: a checkpoint of another model fails here, before Ray starts.
    Local files only; a worker checks one under a URI once it has downloaded it."""
    weights = [join(start_from, MODEL_FILE)] if start_from else []
    init = cfg.checkpoint.initial_checkpoint
    if init:
        weights.append(join(init, MODEL_FILE) if Path(init).is_dir() else init)
    model = split_bn(cfg, architecture)
    for path in weights:
        if not is_uri(path):
            check_architecture(model, Path(path))


def naflex_model_patch_size(cfg: Config, architecture: torch.nn.Module) -> int:
    """The patch size of a model that takes NaFlex patch dicts (timm's NaFlexVit); any other model is refused
    here rather than failing on its first batch in every worker."""
    if not hasattr(architecture, "get_patch_size"):
        raise ConfigError(
            "data.naflex_loader",
            True,
            f"{cfg.model.model} takes image tensors, not NaFlex patch "
            "sequences: use a NaFlexVit model (e.g. naflexvit_base_patch16_gap)",
        )
    height, width = architecture.get_patch_size()
    if height != width:
        raise ConfigError(
            "model.model", cfg.model.model, f"NaFlex batches use square patches; this model's are {height}x{width}"
        )
    sizes = cfg.data.naflex_patch_sizes
    if sizes and set(sizes) != {height} and not getattr(architecture, "supports_patch_interpolation", False):
        raise ConfigError(
            "data.naflex_patch_sizes",
            sizes,
            f"this model embeds {height}x{height} patches only: "
            "build it with --model-kwargs enable_patch_interpolator=True to take other sizes",
        )
    return int(height)


def check_input_size(cfg: Config, architecture: torch.nn.Module, input_size: list) -> None:
    """A model built for one image size (a ViT's fixed patch grid) fails on other sizes inside every worker;
    say so here. As in timm, --img-size sizes the data only: the model's size is a model argument."""
    embed = getattr(architecture, "patch_embed", None)
    fixed = getattr(embed, "img_size", None) if getattr(embed, "strict_img_size", False) else None
    if fixed is not None and tuple(fixed) != tuple(input_size[1:]):
        key, value = ("model.img_size", cfg.model.img_size) if cfg.model.img_size else ("model.input_size", input_size)
        raise ConfigError(
            key,
            value,
            f"{cfg.model.model} is built for {fixed[0]}x{fixed[1]} images: build it "
            f"at {input_size[1]}x{input_size[2]} with --model-kwargs img_size={input_size[1]} (or "
            f"dynamic_img_size=True), or train at {fixed[0]}x{fixed[1]}",
        )
