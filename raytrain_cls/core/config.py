"""Typed, validated run configuration.

One dataclass per concern (data, aug, model, optim, ...). Every field has a name that is unique across groups and
is the dest of timm's train.py flag where timm has one, so three spellings map onto one field:

* grouped YAML, as written to a run's ``config.yaml``:  ``optim: {lr: 0.1}``
* flat YAML, as in timm's ``args.yaml``:                 ``lr: 0.1``
* the command line:                                     ``--lr 0.1``

``validate()`` runs before any Ray work and names the key, the value and the reason for every problem. The config
crosses process boundaries (driver -> Ray workers -> checkpoints) only as a plain dict (``to_dict``), never pickled
as an object, so a checkpoint never needs an allow-listed class to load.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from raytrain_cls.core.datasets import HF_PREFIX, canonical_dataset, dataset_kind
from raytrain_cls.core.datasets import NAMES as DATASET_NAMES
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.storage import is_uri, read_text

RECIPES_DIR = Path(__file__).parents[1] / "recipes"  # raytrain_cls/recipes

# The loss-like metrics are minimised; everything else (top1, top5) is maximised.
EVAL_METRICS = ("top1", "top5", "loss")
# PIL's own default for Image.MAX_IMAGE_PIXELS: larger images are refused as possible decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


# Keys of timm's args.yaml that only mean something to torchrun/SLURM or to timm's own loader: a Ray run has no
# use for them, so they are accepted (with a note) and ignored rather than rejected.
TIMM_IGNORED_KEYS = {
    "local_rank": "Ray assigns ranks",
    "device": "Ray assigns devices",
    "device_modules": "Ray assigns devices",
    "dist_backend": "Ray creates the process group",
    "dist_url": "Ray creates the process group",
    "distributed": "Ray decides",
    "world_size": "set --num-workers",
    "rank": "Ray assigns ranks",
    "prefetcher": "not needed",
    "no_prefetcher": "not needed",
    "no_ddp_bb": "not needed",
    "synchronize_step": "not needed",
    "worker_seeding": "augmentation is seeded per sample",
    "use_multi_epochs_loader": "the loaders keep their processes across epochs already",
    "train_num_samples": "it sizes timm's iterable (streaming) data sets; every source here knows its size",
    "val_num_samples": "it sizes timm's iterable (streaming) data sets; every source here knows its size",
}


def is_off(value: Any) -> bool:
    """A value that switches nothing on: None, False, or empty (how timm writes an unused option)."""
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value)


def patchify_takes_a_layout() -> bool:
    """Whether the installed timm's NaFlex Patchify can lay patches out channels first (timm >= 1.0.2x)."""
    import inspect

    from timm.data.naflex_transforms import Patchify

    return "channels_last" in inspect.signature(Patchify).parameters


class ConfigError(UserError, ValueError):
    """A config problem, always naming the key (dotted: ``optim.lr``), the offending value and why."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"config error: {key} = {value!r}: {reason}")

    def __reduce__(self):
        # Ray carries a worker's exception to the driver by pickling it, and the default pickling rebuilds it from
        # its message alone, which this __init__ does not take.
        return type(self), (self.key, self.value, self.reason), self.__dict__


def option(
    default: Any = None,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    choices: Optional[tuple] = None,
    min: Optional[float] = None,
    gt: Optional[float] = None,
    max: Optional[float] = None,
    nargs: Optional[int | str] = None,
    factory: Any = None,
    parse: Optional[Any] = None,
):
    """A config field with its CLI help, extra flags, allowed values and numeric bounds; ``parse`` reads the
    field's own text forms (the CLI's and YAML's) before the type check."""
    meta = dict(help=help, flags=flags, choices=choices, min=min, gt=gt, max=max, nargs=nargs, parse=parse)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = option(
        "",
        "data set: '' or 'folder' = an ImageFolder tree at --data-dir (timm's default), "
        "'parquet' (shards written by `raytrain-cls prepare`), 'digits' (sklearn, bundled), "
        "'fashion_mnist' (IDX files), 'synthetic' (random images, for throughput only)",
    )
    data_dir: Optional[str] = option(
        None,
        "root of the data set (ImageFolder: train/ and validation/ inside; "
        "parquet: the folder or URI (s3://...) holding manifest.json; "
        "fashion_mnist: the *-ubyte.gz files)",
    )
    train_split: str = option("train", "training split (folder name)")
    val_split: str = option("validation", "validation split; timm's synonyms val/valid/test are searched too")
    class_map: Optional[str] = option(
        None,
        "file pinning class names to indices: one class per line (timm's "
        ".txt), or a YAML/JSON list or {name: index} mapping",
    )
    input_img_mode: Optional[str] = option(
        None,
        "PIL mode images are read in: RGB or L (grey); default: from the model's input channels, which it must match",
        choices=("RGB", "L"),
    )
    input_key: Optional[str] = option(None, "hfds/ data sets: the image column (default: image)")
    target_key: Optional[str] = option(None, "hfds/ data sets: the label column (default: label)")
    dataset_download: bool = option(
        False,
        "hfds/ data sets: allow fetching from the Hugging Face Hub (default: "
        "offline, local folders and the cache only); the built-in data sets "
        "are always read from disk",
    )
    dataset_trust_remote_code: bool = option(
        False, "hfds/ data sets: run the data set's loading script (only datasets < 4 runs scripts)"
    )
    synthetic_samples: int = option(10000, "synthetic data set: training images (validation gets a tenth)", min=1)
    loader: str = option(
        "torch",
        "input pipeline: 'torch' = a DataLoader per training worker (exact mid-epoch "
        "resume, any worker count); 'ray' = Ray Data streaming_split from Parquet shards, "
        "preprocessing on any node's CPUs (needs CPUs left free; resumes at epoch starts)",
        choices=("torch", "ray"),
    )
    gpu_decode: bool = option(
        False,
        "decode and augment on the training device in batches: the loader "
        "processes only read encoded bytes (JPEG decode on the GPU)",
    )
    data_on_device: bool = option(
        False,
        "decode the whole data set once and keep it on the training device; "
        "batches are gathered and augmented there (the --gpu-decode transforms): "
        "no loader processes, for data sets that fit in device memory",
    )
    max_bad_fraction: float = option(
        0.01,
        "unreadable images are skipped and counted; fail when more than this fraction of an epoch's samples is bad",
        min=0,
        max=1,
    )
    max_image_pixels: int = option(
        DEFAULT_MAX_IMAGE_PIXELS,
        "images with more pixels are refused as possible decompression bombs (PIL's default)",
        min=1,
    )
    shuffle_window: int = option(
        8,
        "parquet: the shards' order is shuffled each epoch and samples are shuffled "
        "within windows of this many shards (bounded memory and reads); 0 = one "
        "shuffle over the whole split",
        min=0,
    )
    batch_size: int = option(128, "batch size per training worker", flags=("-b",), min=1)
    validation_batch_size: Optional[int] = option(
        None, "validation batch size per worker (default: --batch-size)", flags=("-vb",), min=1
    )
    workers: int = option(
        4, "data-loading processes per training worker (not Ray workers: see --num-workers)", flags=("-j",), min=0
    )
    pin_mem: bool = option(False, "pin CPU memory of loaded batches (faster host-to-GPU copies)")
    epoch_repeats: float = option(
        0.0, "train on this many passes over the data per epoch (fresh shuffles; 0 = one pass)", min=0, max=1000
    )
    # timm's NaFlex loader: variable-resolution, aspect-preserving patch sequences for NaFlexVit models
    naflex_loader: bool = option(
        False,
        "NaFlex variable-resolution training: each batch resizes its images to at "
        "most one of --naflex-train-seq-lens patches (aspect kept) and holds "
        "--batch-size x max(seq lens) tokens; needs a NaFlexVit model",
    )
    naflex_train_seq_lens: list[int] = option(
        help="NaFlex: the patch-sequence lengths training batches draw from",
        nargs="+",
        min=1,
        factory=lambda: [128, 256, 576, 784, 1024],
    )
    naflex_max_seq_len: int = option(576, "NaFlex: the patch-sequence length of validation", min=1)
    naflex_patch_sizes: Optional[list[int]] = option(
        None, "NaFlex: patch sizes each training batch draws from (default: the model's own)", nargs="+", min=1
    )
    naflex_patch_size_probs: Optional[list[float]] = option(
        None, "NaFlex: the probability of each --naflex-patch-sizes entry (default: equal)", nargs="+", min=0
    )
    naflex_loss_scale: str = option(
        "linear",
        "NaFlex: scale each batch's loss by its size relative to --batch-size: linear, sqrt, or none",
        choices=("linear", "sqrt", "none"),
    )
    naflex_patchify_channels_first: bool = option(
        False,
        "NaFlex: patches flattened channels first (C, P, P) instead of timm's default (P, P, C), for models that "
        "take HF/Gemma-style patches (the model must be built for that layout, e.g. through --model-kwargs)",
    )

    # timm's scheduled-resolution training: each batch one of several image sizes, with its own batch size
    train_img_sizes: Optional[list[int]] = option(
        None,
        "scheduled resolution: each training batch resizes its images to one of these square sizes "
        "(validation stays at the model's input size)",
        nargs="+",
        min=1,
    )
    train_batch_sizes: Optional[list[int]] = option(
        None,
        "scheduled resolution: the per-worker batch size of each image size (default: --batch-size)",
        nargs="+",
        min=1,
    )
    train_size_probs: Optional[list[float]] = option(
        None, "scheduled resolution: the base weight of each image size (default: equal)", nargs="+", min=0
    )
    train_size_schedule: str = option(
        "constant",
        "scheduled resolution: constant (draw with the base weights) or progressive (move from the first size "
        "to the last over --epochs)",
        choices=("constant", "progressive"),
    )
    train_size_schedule_spread: float = option(
        0.65, "progressive schedule: the window's standard deviation, in size-choice units (0: the nearest)", min=0
    )
    train_size_random_mix: float = option(
        0.1, "progressive schedule: the share of uniform draws over all allowed sizes", min=0, max=1
    )
    train_batches_per_epoch: Optional[int] = option(
        None,
        "scheduled resolution: batches per epoch per worker (default: a sample budget, each sample once; "
        "progressive: inferred from the average batch)",
        flags=("--train-steps-per-epoch",),
        min=1,
    )
    variable_batch_loss_scale: str = option(
        "none",
        "scheduled resolution: scale each batch's loss by its size relative to the policy-average batch: "
        "none, sqrt or linear",
        choices=("none", "sqrt", "linear"),
    )

    def check(self) -> None:
        """The data set exists in the catalogue and has what its kind needs; the loader can read it."""
        dataset = canonical_dataset(self.dataset)
        if dataset.startswith(HF_PREFIX):
            self._check_hf()
        elif dataset.startswith("hfids/"):
            raise ConfigError(
                "data.dataset",
                self.dataset,
                "streaming (iterable) data sets are not a source here: use "
                "hfds/NAME (a saved, local or cached data set), or Parquet shards",
            )
        elif dataset not in DATASET_NAMES:
            raise ConfigError(
                "data.dataset",
                self.dataset,
                f"unknown data set; choose one of {[*DATASET_NAMES, 'hfds/NAME']}"
                f"{_suggest(self.dataset, DATASET_NAMES)}",
            )
        else:
            for key in ("input_key", "target_key", "dataset_trust_remote_code"):
                if getattr(self, key):
                    raise ConfigError(
                        f"data.{key}", getattr(self, key), "only for Hugging Face data sets (--dataset hfds/NAME)"
                    )
        kind = dataset_kind(dataset)
        if kind.needs_data_dir and not self.data_dir:
            what = "an ImageFolder data set" if dataset == "folder" else "a Parquet shard data set"
            raise ConfigError(
                "data.data_dir", self.data_dir, f"{what} needs --data-dir (or choose --dataset digits / fashion_mnist)"
            )
        if self.class_map and not is_uri(self.class_map) and not Path(self.class_map).is_file():
            raise ConfigError("data.class_map", self.class_map, "no such file")
        if self.class_map and dataset != "folder":
            raise ConfigError(
                "data.class_map",
                self.class_map,
                f"only ImageFolder trees take a class map ({dataset} data sets carry their own class list)",
            )
        if self.loader == "ray" and dataset != "parquet":
            raise ConfigError(
                "data.loader",
                self.loader,
                "Ray Data reads Parquet shards: convert the data with "
                "`raytrain-cls prepare SRC DST` and pass --dataset parquet --data-dir DST",
            )
        if self.loader == "ray" and self.gpu_decode:
            raise ConfigError(
                "data.gpu_decode", True, "Ray Data preprocesses on CPUs: --gpu-decode needs --loader torch"
            )
        if self.gpu_decode and not kind.encoded:
            raise ConfigError(
                "data.gpu_decode",
                True,
                f"the {dataset} data set holds decoded pixels, not encoded "
                "images: use --dataset parquet or folder, or --data-on-device",
            )
        if self.data_on_device:
            for key, value, reason in (
                ("data.gpu_decode", self.gpu_decode, "the data are decoded once, at start: drop --gpu-decode"),
                ("data.loader", self.loader == "ray" and self.loader, "Ray Data streams from CPUs: --loader torch"),
                ("data.naflex_loader", self.naflex_loader, "NaFlex batches are built by the CPU DataLoader path"),
            ):
                if value:
                    raise ConfigError(key, value, f"not with --data-on-device: {reason}")
        probs = self.naflex_patch_size_probs
        if self.naflex_loader and probs is not None:
            if not self.naflex_patch_sizes:
                raise ConfigError("data.naflex_patch_size_probs", probs, "give the sizes too (--naflex-patch-sizes)")
            if len(probs) != len(self.naflex_patch_sizes):
                raise ConfigError(
                    "data.naflex_patch_size_probs",
                    probs,
                    f"needs one probability per patch size ({len(self.naflex_patch_sizes)})",
                )
            if sum(probs) <= 0:
                raise ConfigError("data.naflex_patch_size_probs", probs, "must not all be 0")
        if self.naflex_patchify_channels_first:
            if not self.naflex_loader:
                raise ConfigError(
                    "data.naflex_patchify_channels_first", True, "lays out NaFlex patches: it needs --naflex-loader"
                )
            if not patchify_takes_a_layout():
                raise ConfigError(
                    "data.naflex_patchify_channels_first",
                    True,
                    "the installed timm's NaFlex Patchify has no channels-first layout (a newer timm has it)",
                )
        self._check_scheduled_sizes()

    def _check_scheduled_sizes(self) -> None:
        """--train-img-sizes and its options: one entry per size, something to draw, nothing set in vain."""
        sizes = self.train_img_sizes
        progressive_only = ("train_size_schedule_spread", "train_size_random_mix")
        if not sizes:
            for key, value in self._changed(
                "train_batch_sizes",
                "train_size_probs",
                "train_batches_per_epoch",
                "train_size_schedule",
                "variable_batch_loss_scale",
                *progressive_only,
            ):
                raise ConfigError(f"data.{key}", value, "a scheduled-resolution option: it needs --train-img-sizes")
            return
        for key in ("train_batch_sizes", "train_size_probs"):
            value = getattr(self, key)
            if value is not None and len(value) != len(sizes):
                raise ConfigError(f"data.{key}", value, f"needs one entry per --train-img-sizes size ({len(sizes)})")
        if self.train_size_probs is not None and sum(self.train_size_probs) <= 0:
            raise ConfigError("data.train_size_probs", self.train_size_probs, "must not all be 0")
        if self.train_size_schedule == "progressive" and len(sizes) < 2:
            raise ConfigError(
                "data.train_size_schedule",
                "progressive",
                "moves from the first size to the last: give two sizes or more",
            )
        if self.train_size_schedule != "progressive":
            for key, value in self._changed(*progressive_only):
                raise ConfigError(
                    f"data.{key}", value, "shapes a progressive schedule: --train-size-schedule progressive"
                )
        for key, value, reason in (
            ("naflex_loader", self.naflex_loader, "NaFlex and scheduled sizes are alternative loader modes"),
            ("loader", self.loader == "ray" and self.loader, "Ray Data batches have one size: --loader torch"),
        ):
            if value:
                raise ConfigError(f"data.{key}", value, f"not with --train-img-sizes: {reason}")

    def _changed(self, *keys: str) -> list[tuple[str, Any]]:
        """(key, value) of those of ``keys`` that are set: away from the field's default, and not off."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        values = [(key, getattr(self, key)) for key in keys]
        return [(key, value) for key, value in values if value != defaults[key] and not is_off(value)]

    def _check_hf(self) -> None:
        if importlib.util.find_spec("datasets") is None:
            raise ConfigError(
                "data.dataset",
                self.dataset,
                "Hugging Face data sets need the datasets package: pip install datasets (or 'raytrain-cls[hf]')",
            )
        if not self.dataset[len(HF_PREFIX) :]:
            raise ConfigError("data.dataset", self.dataset, "name the data set: hfds/PATH_OR_HUB_NAME")
        if self.dataset_trust_remote_code:
            from importlib.metadata import version

            if int(version("datasets").split(".")[0]) >= 4:
                raise ConfigError(
                    "data.dataset_trust_remote_code",
                    True,
                    f"datasets {version('datasets')} runs no "
                    "loading scripts any more: use a data set in a standard format (Parquet, image "
                    "folder), or convert it",
                )


@dataclass
class AugConfig:
    no_aug: bool = option(False, "disable all training augmentation")
    scale: list[float] = option(help="random-resized-crop scale range", nargs=2, factory=lambda: [0.08, 1.0])
    ratio: list[float] = option(
        help="random-resized-crop aspect ratio range", nargs=2, factory=lambda: [3.0 / 4.0, 4.0 / 3.0]
    )
    hflip: float = option(0.5, "horizontal flip probability", min=0, max=1)
    vflip: float = option(0.0, "vertical flip probability", min=0, max=1)
    color_jitter: float = option(0.4, "color jitter factor", min=0)
    color_jitter_prob: Optional[float] = option(
        None, "apply the color jitter with this probability (default: always)", min=0, max=1
    )
    grayscale_prob: Optional[float] = option(None, "random grayscale probability (default: off)", min=0, max=1)
    gaussian_blur_prob: Optional[float] = option(None, "random gaussian blur probability (default: off)", min=0, max=1)
    train_crop_mode: Optional[str] = option(
        None,
        "training crop: rrc (random-resized crop, default), rkrc / rkrr (timm's keep-ratio variants)",
        choices=("rrc", "rkrc", "rkrr"),
    )
    aa: Optional[str] = option(None, "auto-augment policy, e.g. rand-m9-mstd0.5-inc1, original, augmix-m5-w4-d2")
    train_interpolation: str = option(
        "random", "training interpolation", choices=("random", "bilinear", "bicubic", "nearest")
    )
    reprob: float = option(0.0, "random erase probability", min=0, max=1)
    remode: str = option("pixel", "random erase mode", choices=("pixel", "const", "rand"))
    recount: int = option(1, "random erase count", min=1)
    resplit: bool = option(False, "with --aug-splits: no random erasing on the first (clean) split")
    aug_repeats: int = option(
        0,
        "repeated augmentation: each epoch holds 1/N as many samples, each N times with "
        "its own augmentation, the copies dealt to different workers (0 = off; timm "
        "--aug-repeats)",
        min=0,
        max=64,
    )
    aug_splits: int = option(
        0,
        "AugMix-style splits: each sample as a clean view plus N-1 augmented ones "
        "(0 = off, else >= 2; timm --aug-splits)",
        min=0,
    )
    mixup: float = option(0.0, "mixup alpha; mixup is on when > 0", min=0)
    cutmix: float = option(0.0, "cutmix alpha; cutmix is on when > 0", min=0)
    cutmix_minmax: Optional[list[float]] = option(None, "cutmix min/max ratio; overrides alpha when set", nargs=2)
    mixup_prob: float = option(1.0, "probability of mixup or cutmix per batch", min=0, max=1)
    mixup_switch_prob: float = option(0.5, "probability of switching to cutmix when both are on", min=0, max=1)
    mixup_mode: str = option("batch", "how mixup/cutmix params are drawn", choices=("batch", "pair", "elem"))
    mixup_off_epoch: int = option(0, "turn mixup off from this epoch (0 = never)", min=0)

    def check(self) -> None:
        for name, pair in (
            ("aug.scale", self.scale),
            ("aug.ratio", self.ratio),
            ("aug.cutmix_minmax", self.cutmix_minmax),
        ):
            if pair is not None and not (0 < pair[0] <= pair[1]):
                raise ConfigError(name, pair, "needs 0 < low <= high")
        if self.scale[1] > 1:
            raise ConfigError("aug.scale", self.scale, "a crop cannot be larger than the image (high <= 1)")
        if self.aug_splits == 1:
            raise ConfigError("aug.aug_splits", 1, "0 (off) or at least 2 (a clean view and augmented ones)")
        if self.aug_splits and self.mixing:
            raise ConfigError(
                "aug.aug_splits", self.aug_splits, "mixup/cutmix would mix across the splits: use one or the other"
            )

    @property
    def mixing(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass
class ModelConfig:
    model: str = option("resnet50", "any timm model name")
    pretrained: bool = option(False, "start from pretrained weights: needs --pretrained-path here (no downloads)")
    pretrained_path: Optional[str] = option(None, "local file of pretrained weights (.safetensors or .pth)")
    num_classes: Optional[int] = option(None, "number of classes (default: from the data set)", min=1)
    gp: Optional[str] = option(None, "global pool type", choices=("fast", "avg", "max", "avgmax", "catavgmax"))
    img_size: Optional[int] = option(None, "image size (default: the model's)", min=1)
    in_chans: Optional[int] = option(None, "input channels (default: 3; grey data is converted to RGB)", min=1)
    input_size: Optional[list[int]] = option(None, "input size as C H W (overrides --img-size)", nargs=3)
    crop_pct: Optional[float] = option(None, "validation center-crop fraction", gt=0, max=1)
    mean: Optional[list[float]] = option(None, "normalisation mean per channel", nargs="+")
    std: Optional[list[float]] = option(None, "normalisation std per channel", nargs="+")
    interpolation: str = option(
        "", "validation resize interpolation (default: the model's)", choices=("", "bilinear", "bicubic", "nearest")
    )
    drop: float = option(0.0, "dropout rate before the classifier", min=0, max=1)
    drop_path: Optional[float] = option(None, "stochastic depth rate", min=0, max=1)
    drop_block: Optional[float] = option(None, "drop block rate", min=0, max=1)
    bn_momentum: Optional[float] = option(None, "BatchNorm momentum override", gt=0, max=1)
    bn_eps: Optional[float] = option(None, "BatchNorm epsilon override", gt=0)
    grad_checkpointing: bool = option(False, "activation (gradient) checkpointing: less memory, more compute")
    head_init_scale: Optional[float] = option(None, "multiply the classifier's initial weights and bias by this")
    head_init_bias: Optional[float] = option(None, "set the classifier's initial bias to this value")
    split_bn: bool = option(False, "separate BatchNorm statistics per augmentation split (timm --split-bn)")
    fast_norm: bool = option(False, "timm's fast (lower-precision under AMP) LayerNorm/GroupNorm kernels")
    torchscript: bool = option(
        False, "torch.jit.script the model (not with --torchcompile, --sync-bn, --grad-checkpointing)"
    )
    fuser: str = option(
        "",
        "TorchScript JIT fuser for --torchscript: te (tensor expressions), old (legacy); '' = torch's default",
        choices=("", "te", "old", "legacy", "nvfuser", "nvf"),
    )
    torchcompile: Optional[str] = option(None, "torch.compile the model with this backend (e.g. inductor)")
    torchcompile_mode: Optional[str] = option(None, "torch.compile mode (default, reduce-overhead, max-autotune)")
    sync_bn: bool = option(False, "synchronised BatchNorm across workers (GPU workers only)")
    dist_bn: str = option(
        "reduce",
        "BatchNorm stats across workers after each epoch: reduce (average), broadcast (rank 0's) or '' (leave)",
        choices=("reduce", "broadcast", ""),
    )
    channels_last: bool = option(False, "use channels_last memory layout")
    model_kwargs: dict = option(help="extra timm.create_model keyword arguments, k=v", nargs="*", factory=dict)

    def check(self) -> None:
        if self.pretrained and not self.pretrained_path:
            raise ConfigError(
                "model.pretrained",
                True,
                "this service never downloads weights: give the local file with --pretrained-path FILE",
            )
        if self.pretrained_path and not is_uri(self.pretrained_path) and not Path(self.pretrained_path).is_file():
            raise ConfigError("model.pretrained_path", self.pretrained_path, "no such file")
        if self.torchcompile:
            from torch._dynamo import list_backends  # local: torch only when a backend is named

            backends = list_backends(exclude_tags=())
            if self.torchcompile not in backends:
                raise ConfigError(
                    "model.torchcompile",
                    self.torchcompile,
                    f"not a torch.compile backend{_suggest(self.torchcompile, backends)}",
                )
        if self.fuser in ("nvfuser", "nvf") and not _torch_has_nvfuser():
            import torch

            raise ConfigError(
                "model.fuser",
                self.fuser,
                f"this PyTorch ({torch.__version__}) has no nvfuser (removed "
                "from TorchScript in PyTorch 2.2): use te, or --torchcompile",
            )
        if self.torchscript:
            for key, clash in (
                ("model.torchcompile", self.torchcompile),
                ("model.sync_bn", self.sync_bn),
                ("model.grad_checkpointing", self.grad_checkpointing),
            ):
                if clash:
                    raise ConfigError(key, clash, "cannot be combined with --torchscript (as in timm)")
        if self.input_size is not None and (len(self.input_size) != 3 or min(self.input_size) < 1):
            raise ConfigError("model.input_size", self.input_size, "needs three positive numbers: C H W")
        for name, val in (("model.mean", self.mean), ("model.std", self.std)):
            chans = (self.input_size[0] if self.input_size else self.in_chans) or 3
            if val is not None and len(val) not in (1, chans):
                want = "1 value" if chans == 1 else f"1 or {chans} values (one per input channel)"
                raise ConfigError(name, val, f"needs {want}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError("model.std", self.std, "every std must be > 0")


@dataclass
class OptimConfig:
    opt: str = option("sgd", "optimizer: any timm optimizer name (sgd, momentum, adamw, lamb, lion, ...)")
    opt_eps: Optional[float] = option(None, "optimizer epsilon", gt=0)
    opt_betas: Optional[list[float]] = option(None, "optimizer betas", nargs="+")
    momentum: float = option(0.9, "SGD momentum", min=0)
    weight_decay: float = option(2e-5, "weight decay (not applied to biases and norm layers)", min=0)
    clip_grad: Optional[float] = option(None, "gradient clipping threshold (off when unset)", gt=0)
    clip_mode: str = option("norm", "gradient clipping mode", choices=("norm", "value", "agc"))
    lr: Optional[float] = option(
        None,
        "learning rate; unset = --lr-base scaled by the global batch, resolved once on the driver and recorded",
        gt=0,
    )
    layer_decay: Optional[float] = option(None, "layer-wise LR decay (e.g. 0.65 for ViT fine-tuning)", gt=0, max=1)
    layer_decay_min_scale: float = option(0.0, "layer decay: the smallest LR scale any layer gets", min=0, max=1)
    layer_decay_no_opt_scale: Optional[float] = option(
        None, "layer decay: layers scaled below this are frozen (not optimized)", min=0, max=1
    )
    opt_kwargs: dict = option(help="extra optimizer keyword arguments, k=v", nargs="*", factory=dict)
    lr_base: float = option(0.1, "base learning rate for --lr-base-size samples", gt=0)
    lr_base_size: int = option(256, "global batch size that --lr-base is given for", min=1)
    lr_base_scale: str = option(
        "",
        "lr scaling rule: linear or sqrt ('' = sqrt for adaptive optimizers, else linear)",
        choices=("", "linear", "sqrt"),
    )
    grad_accum_steps: int = option(1, "micro-batches per optimizer step", min=1)

    def check(self) -> None:
        if self.opt_betas is not None and not all(0 <= b < 1 for b in self.opt_betas):
            raise ConfigError("optim.opt_betas", self.opt_betas, "betas must lie in [0, 1)")


@dataclass
class SchedConfig:
    sched: str = option(
        "cosine", "LR schedule", choices=("cosine", "tanh", "step", "multistep", "plateau", "poly", "none")
    )
    epochs: int = option(300, "epochs to train (before cooldown)", min=1)
    start_epoch: Optional[int] = option(
        None,
        "start a new run at this epoch, the LR schedule stepped there "
        "(timm's manual epoch number; a run continuing from its own "
        "checkpoint keeps its place)",
        min=0,
    )
    warmup_epochs: int = option(5, "LR warmup epochs", min=0)
    warmup_lr: float = option(1e-5, "warmup starting LR", min=0)
    warmup_prefix: bool = option(False, "exclude warmup from the decay schedule")
    min_lr: float = option(0.0, "lower LR bound for cyclic schedules", min=0)
    cooldown_epochs: int = option(0, "epochs at --min-lr after the schedule ends", min=0)
    decay_epochs: float = option(90, "epoch interval to decay the LR (step)", gt=0)
    decay_milestones: list[int] = option(
        help="epochs at which to decay the LR (multistep)", nargs="+", factory=lambda: [90, 180, 270]
    )
    decay_rate: float = option(0.1, "LR decay rate (also the poly power)", gt=0)
    patience_epochs: int = option(10, "patience epochs for the plateau schedule", min=0)
    lr_noise: Optional[list[float]] = option(None, "LR noise on/off epoch fractions", nargs="+")
    lr_noise_pct: float = option(0.67, "LR noise limit percent", min=0)
    lr_noise_std: float = option(1.0, "LR noise standard deviation", min=0)
    lr_cycle_mul: float = option(1.0, "LR cycle length multiplier", gt=0)
    lr_cycle_decay: float = option(0.5, "LR decay per cycle", gt=0)
    lr_cycle_limit: int = option(1, "LR cycle limit", min=1)
    lr_k_decay: float = option(1.0, "LR k-decay for cosine/poly", gt=0)
    sched_on_updates: bool = option(False, "step the LR schedule per optimizer update, not per epoch")

    def check(self) -> None:
        if self.sched == "plateau" and self.sched_on_updates:
            raise ConfigError(
                "sched.sched_on_updates",
                True,
                "the plateau schedule decides once per epoch, on the "
                "eval metric: drop --sched-on-updates or pick another --sched",
            )
        ms = self.decay_milestones
        if self.sched == "multistep" and not all(a < b for a, b in zip(ms, ms[1:])):
            raise ConfigError("sched.decay_milestones", ms, "must be strictly increasing")


@dataclass
class LossConfig:
    smoothing: float = option(0.1, "label smoothing", min=0, max=1)
    bce_loss: bool = option(False, "binary cross entropy instead of softmax cross entropy")
    bce_target_thresh: Optional[float] = option(None, "threshold that binarises soft BCE targets", min=0, max=1)
    kd_model_name: Optional[str] = option(
        None, "teacher model (any timm name) for knowledge distillation; its weights come from --kd-model-path"
    )
    kd_model_path: Optional[str] = option(
        None, "teacher weights: .safetensors, .pth (weights only), or a checkpoint/export folder (never downloaded)"
    )
    kd_distill_type: str = option(
        "logit",
        "distillation type: logit (KL on the logits), feature (MSE on pooled "
        "features, projected when widths differ), token (the distillation head "
        "of a *_distilled model)",
        choices=("logit", "feature", "token"),
    )
    kd_loss_type: str = option(
        "kl", "logit distillation loss (timm's --kd-loss-type; kl is the one timm has)", choices=("kl",)
    )
    kd_student_feature_dim: Optional[int] = option(
        None, "feature distillation: the student's feature width (default: the model's)", min=1
    )
    kd_teacher_feature_dim: Optional[int] = option(
        None, "feature distillation: the teacher's feature width (default: the model's)", min=1
    )
    kd_token_distill_type: str = option(
        "soft",
        "token distillation: soft (KL at --kd-temperature) or hard (the teacher's argmax as the label)",
        choices=("soft", "hard"),
    )
    kd_temperature: float = option(4.0, "distillation softmax temperature", gt=0)
    distill_loss_weight: Optional[float] = option(None, "weight of the distillation loss (timm's rules)", min=0)
    task_loss_weight: Optional[float] = option(None, "weight of the task loss; alone: distill = 1 - task", min=0)
    jsd_loss: bool = option(False, "Jensen-Shannon divergence + CE over the --aug-splits views (timm --jsd-loss)")
    bce_sum: bool = option(False, "BCE: sum over the classes, then average over the batch (timm --bce-sum)")
    bce_pos_weight: Optional[float] = option(None, "BCE: weight of the positive class (timm --bce-pos-weight)", gt=0)

    def check(self) -> None:
        if self.kd_model_name:
            if not self.kd_model_path:
                raise ConfigError(
                    "loss.kd_model_name",
                    self.kd_model_name,
                    "this service never downloads weights: give the teacher's local weights with --kd-model-path",
                )
            if not is_uri(self.kd_model_path) and not Path(self.kd_model_path).exists():
                raise ConfigError("loss.kd_model_path", self.kd_model_path, "no such file or folder")
        elif self.kd_model_path:
            raise ConfigError(
                "loss.kd_model_path", self.kd_model_path, "set --kd-model-name (the teacher's architecture) too"
            )


@dataclass
class EmaConfig:
    model_ema: bool = option(False, "keep an exponential moving average of the weights")
    model_ema_decay: float = option(0.9998, "EMA decay", gt=0, max=1)
    model_ema_warmup: bool = option(False, "EMA decay warmup")
    model_ema_force_cpu: bool = option(False, "keep the EMA on the CPU")

    def check(self) -> None:
        pass  # every EMA field is checked on its own (range, type)


@dataclass
class PrecisionConfig:
    amp: bool = option(False, "mixed precision autocast")
    amp_dtype: str = option(
        "float16", "autocast dtype (float16 uses a GradScaler and needs GPUs)", choices=("float16", "bfloat16")
    )
    model_dtype: Optional[str] = option(
        None,
        "keep the weights (and inputs) in this dtype, without AMP (timm --model-dtype); float16 needs GPUs",
        choices=("float32", "bfloat16", "float16"),
    )

    def check(self) -> None:
        if self.model_dtype in ("bfloat16", "float16") and self.amp:
            raise ConfigError(
                "precision.model_dtype",
                self.model_dtype,
                "low-precision weights and --amp do not mix (as in timm): drop --amp, or --model-dtype",
            )


@dataclass
class CheckpointConfig:
    output: str = option("", "where runs go (local path or URI); default ./output/train")
    experiment: str = option("", "run name (default: a fresh unique name); the run directory is <output>/<experiment>")
    checkpoint_hist: int = option(10, "best checkpoints to keep (plus the latest)", min=1)
    eval_metric: str = option("top1", "metric that picks the best checkpoint", choices=EVAL_METRICS)
    val_interval: int = option(1, "evaluate and checkpoint every N epochs (the last epoch always)", min=1)
    tta: int = option(
        0,
        "test-time augmentation in each epoch's validation: > 0 averages the logits with those "
        "of the horizontally flipped images",
        min=0,
    )
    max_failures: int = option(0, "worker-group failures to recover from (Ray FailureConfig); -1 = unlimited", min=-1)
    recovery_interval: int = option(
        0,
        "also checkpoint every N optimizer updates inside an epoch (0 = off); resuming "
        "from one continues that epoch exactly where it stopped",
        min=0,
    )
    preemption_check_interval: int = option(
        50,
        "every N optimizer updates, ask Ray Train whether a node of the run "
        "is being preempted (drained); on the first notice, write a recovery "
        "checkpoint at once so the restart loses nothing (0 = never ask)",
        min=0,
    )
    max_preemption_failures: int = option(
        -1,
        "node preemptions to recover from, counted apart from --max-failures (Ray FailureConfig); -1 = unlimited",
        min=-1,
    )
    resume: str = option(
        "",
        "continue a run (its directory, or its name under --output), or start a new run from "
        "a checkpoint directory (weights, optimizer, epoch)",
    )
    no_resume_opt: bool = option(False, "with --resume CHECKPOINT: restore the weights but not the optimizer state")
    initial_checkpoint: str = option(
        "",
        "start from these weights only (a checkpoint directory or .safetensors "
        "file), at epoch 0 with a fresh optimizer, as timm's --initial-checkpoint",
    )
    nan_patience: int = option(5, "stop the run after this many consecutive NaN/Inf losses", min=1)

    @property
    def score_mode(self) -> str:
        """Which way --eval-metric improves: "min" for the loss, "max" for an accuracy."""
        return "min" if self.eval_metric == "loss" else "max"

    def check(self) -> None:
        name = self.experiment
        if name and (name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip()):
            raise ConfigError(
                "checkpoint.experiment",
                name,
                "a run name is one folder name under --output (no '/', '\\', '..' or '.', no surrounding spaces): "
                "choose where runs go with --output",
            )
        init = self.initial_checkpoint
        if init and not is_uri(init) and not Path(init).exists():
            raise ConfigError("checkpoint.initial_checkpoint", init, "no such checkpoint directory or file")
        if init and is_uri(init) and init.split("?")[0].endswith(".safetensors"):
            raise ConfigError(
                "checkpoint.initial_checkpoint",
                init,
                "under a URI give the checkpoint directory "
                "(s3://.../epoch-0009); a single .safetensors file must be local",
            )


@dataclass
class RunConfig:
    seed: int = option(42, "random seed (each worker uses seed + rank)")
    log_interval: int = option(50, "steps between progress lines", min=1)
    save_images: bool = option(
        False,
        "save the training batch at every log line as a JPEG grid in <run dir>/images (to check the augmentation)",
    )
    progress: str = option(
        "auto",
        "console progress: 'bar' = a live bar per epoch with loss, lr, img/s and ETA "
        "(drawn by the driver), 'lines' = a plain line every --log-interval steps, "
        "'auto' = the bar on a terminal, lines otherwise",
        choices=("auto", "bar", "lines"),
    )
    log_tensorboard: bool = option(True, "write TensorBoard event files to <run dir>/tensorboard (rank 0)")
    log_mlflow: bool = option(
        False, "also log params and epoch metrics to MLflow (pip install mlflow; MLFLOW_TRACKING_URI picks the server)"
    )
    log_wandb: bool = option(
        False,
        "also log the config and metrics to Weights & Biases (pip install wandb; "
        "WANDB_API_KEY / WANDB_MODE=offline as wandb reads them)",
    )
    wandb_project: Optional[str] = option(None, "W&B project (default: raytrain-cls)")
    wandb_tags: list[str] = option(help="W&B run tags", nargs="*", factory=list)
    wandb_resume_id: str = option(
        "", "continue this existing W&B run id (default: the run's own id, kept across recovery and --resume)"
    )

    def check(self) -> None:
        for name, package in (("log_mlflow", "mlflow"), ("log_wandb", "wandb")):
            if getattr(self, name) and importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"run.{name}",
                    True,
                    f"{package} is not installed: pip install {package} (or "
                    f"'raytrain-cls[{package}]'), or drop --{name.replace('_', '-')}",
                )


def parse_worker_count(value: Any) -> Any:
    """--num-workers N or MIN:MAX (also "MIN:MAX" and [MIN, MAX] in YAML) -> N or [MIN, MAX]; a range whose ends
    are equal is that fixed count. Anything else is left for the type check to refuse."""
    if isinstance(value, str):
        text = value.strip()
        parts = text.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            value = [int(p) for p in parts]
        elif text.isdigit():
            value = int(text)
        else:
            raise ConfigError("scaling.num_workers", value, "expected a worker count N or a range MIN:MAX, e.g. 1:4")
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], int) and value[0] < 1:
        raise ConfigError(
            "scaling.num_workers",
            list(value),
            "an elastic range starts at one worker (MIN >= 1); 0 alone is local mode",
        )
    return list(value) if isinstance(value, tuple) else value


@dataclass
class ScalingConfig:
    num_workers: Optional[int | list[int]] = option(
        None,
        "Ray training workers (processes, one per GPU), N or MIN:MAX for elastic training (the run starts with "
        "at least MIN and grows to MAX as the cluster allows); default: one per GPU the cluster has or its "
        "autoscaler can add, when using GPUs, else one per node with the node's CPUs as threads; 0: Ray Train's "
        "local mode, the run trains in this command's own process on this machine (its CPUs as threads, or "
        "its first GPU), no Ray cluster started or joined",
        min=0,
        parse=parse_worker_count,
    )
    elastic_resize_interval: float = option(
        60.0,
        "elastic training (--num-workers MIN:MAX): seconds between Ray Train's checks for more or fewer workers "
        "(its elastic_resize_monitor_interval_s)",
        min=0,
    )
    use_gpu: Optional[bool] = option(
        None, "train on GPUs (default: when the Ray cluster has them or its autoscaler can add them)"
    )
    resources_per_worker: Optional[dict] = option(None, "Ray resources per worker, e.g. CPU=4 GPU=1", nargs="*")
    placement_strategy: str = option(
        "PACK", "how Ray places the workers on nodes", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )

    @property
    def local_mode(self) -> bool:
        """--num-workers 0, as Ray Train's ScalingConfig(num_workers=0): train in the command's own process."""
        return self.num_workers == 0

    def worker_range(self) -> Optional[tuple[int, int]]:
        """(MIN, MAX) of an elastic run, else None (a fixed worker count, or none given)."""
        n = self.num_workers
        return (n[0], n[1]) if isinstance(n, list) else None

    def check(self) -> None:
        for k, v in (self.resources_per_worker or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"scaling.resources_per_worker.{k}", v, "must be a number >= 0")
        n = self.num_workers
        if isinstance(n, list) and (len(n) != 2 or n[0] > n[1]):
            raise ConfigError(
                "scaling.num_workers", n, "a range is [MIN, MAX] (MIN:MAX on the command line), MIN <= MAX"
            )

        if self.elastic_resize_interval != 60.0 and not isinstance(n, list):
            raise ConfigError(
                "scaling.elastic_resize_interval",
                self.elastic_resize_interval,
                "only for elastic training: give --num-workers MIN:MAX",
            )


@dataclass
class Resolved:
    """What the driver worked out once for the whole run, recorded in config.yaml and carried to every worker:
    a worker never re-derives these (the LR from the global batch, the classes from a scan of the data)."""

    use_gpu: bool
    num_workers: int  # an elastic run's MAX: its global batch and LR are resolved at that size
    lr: float  # --lr, or --lr-base scaled by the global batch (lr_rule says which)
    lr_rule: str
    num_epochs: int  # the scheduler's real length, cooldown included
    num_classes: int
    classes: list
    train_samples: int
    val_samples: int
    data_config: dict  # timm's resolved data config: input_size, mean, std, crop_pct, interpolation, ...
    naflex_patch_size: Optional[int] = None  # --naflex-loader: the model's patch size
    min_workers: Optional[int] = None  # an elastic run's MIN (None: a fixed worker count)
    # What each worker reserves: --resources-per-worker, or the default CPU layout's node-filling CPU count
    resources_per_worker: Optional[dict] = None
    # Where the run lives, set once its directory is chosen.
    output: Optional[str] = None
    experiment: Optional[str] = None
    run_dir: Optional[str] = None
    wandb_id: Optional[str] = None  # one W&B run across recoveries and --resume
    init_checkpoint: Optional[str] = None  # the --resume / --initial-checkpoint a run was started from
    # This fit's only, handed to the workers: the live progress display's actor and the driver's start-up stamps.
    progress_board: Any = None
    startup: Optional[dict] = None
    checkpoint_requests: Optional[str] = None  # elastic: the actor a resize asks for a checkpoint (run/elastic.py)

    @classmethod
    def from_dict(cls, raw: Any) -> Optional[Resolved]:
        """From config.yaml's `resolved` mapping (None or {} before the driver resolved anything)."""
        if not raw:
            return None
        if not isinstance(raw, dict):
            raise ConfigError("resolved", raw, "expected a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"resolved.{unknown[0]}", raw[unknown[0]], "unknown key (written by the driver only)")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in raw and f.default is MISSING)
        if missing:
            raise ConfigError(f"resolved.{missing[0]}", None, "missing (written by the driver only)")
        return cls(**raw)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # What the driver worked out once for the whole run (lr, epochs, workers, ...): never set by hand.
    resolved: Optional[Resolved] = None

    # ---- plain-dict round trip -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> Config:
        """An independent copy (to_dict already deep-copies every value)."""
        return Config.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        cfg = cls()
        cfg.update(raw)
        return cfg

    def update(self, raw: dict) -> Config:
        """Apply a grouped or flat (timm args.yaml style) mapping, checking each key and value's type."""
        if not isinstance(raw, dict):
            raise ConfigError("<config>", raw, "expected a mapping of keys to values")
        for key, value in raw.items():
            if key == "resolved":
                self.resolved = Resolved.from_dict(value)
            elif key in GROUPS and value is None:
                continue  # a section whose entries are all commented out
            elif key in GROUPS and isinstance(value, dict):
                for name, v in value.items():
                    if FIELDS.get(name, (None,))[0] != key:
                        raise ConfigError(f"{key}.{name}", v, f"unknown key{_suggest(name, GROUP_FIELDS[key])}")
                    self.set(name, v)
            elif key in FIELDS:
                self.set(key, value)
            elif key in TIMM_IGNORED_KEYS:
                if value is not None:  # unset: nothing is being ignored
                    print(f"note: ignoring timm key '{key}' ({TIMM_IGNORED_KEYS[key]})", file=sys.stderr)
            elif key == "train_steps_per_epoch":  # the second spelling of timm's --train-batches-per-epoch
                if value is not None:
                    self.set("train_batches_per_epoch", value)
            elif key == "drop_connect":  # timm's deprecated name for drop_path, still in its args.yaml
                if value is not None:
                    self.set("drop_path", value)
            elif key == "data" and (value is None or isinstance(value, str)):
                if value and not self.data.data_dir:  # timm's deprecated positional data dir
                    self.set("data_dir", value)
            elif is_off(value):  # maybe a newer timm's key: at "off" it asks for nothing, so it can pass
                print(f"note: ignoring unknown key '{key}' ({value!r}, off: from a newer timm?)", file=sys.stderr)
            else:
                raise ConfigError(
                    str(key),
                    value,
                    f"unknown key{_suggest(str(key), list(FIELDS) + list(GROUPS))} (if a newer timm wrote it, this "
                    "version cannot do what it asks: set it to its default or drop it)",
                )
        return self

    def set(self, name: str, value: Any) -> None:
        group, f = FIELDS[name]
        parse = f.metadata.get("parse")
        if parse is not None:
            value = parse(value)
        setattr(getattr(self, group), name, _coerce(f"{group}.{name}", value, _hint(group, name)))

    def get(self, name: str) -> Any:
        return getattr(getattr(self, FIELDS[name][0]), name)

    def flat(self) -> dict:
        return {name: self.get(name) for name in FIELDS}

    # ---- checks ----------------------------------------------------------------------------------------------
    def validate(self, registries: bool = True) -> Config:
        """Check every value, then each group on its own, then the combinations across groups that cannot work,
        then (``registries``) the names looked up in timm's registries; raise the first ConfigError found.
        Without ``registries`` timm is not imported: for a Tune trial whose optimizer and teacher names are its
        search's, already looked up there (run/trial.py)."""
        for name, (group, f) in FIELDS.items():
            _check_field(f"{group}.{name}", self.get(name), f)
        for group in GROUPS:
            getattr(self, group).check()
        for key, value, reason in self._clashes():
            if value:
                raise ConfigError(key, value, reason)
        if registries:
            self._check_registries()
        return self

    def _check_registries(self) -> None:
        """The optimizer and the distillation teacher are names timm knows (the model's own is checked where it is
        built on the meta device, before Ray starts)."""
        _check_optimizer("optim.opt", self.optim.opt)
        if self.loss.kd_model_name and not timm_model_known(self.loss.kd_model_name):
            raise ConfigError("loss.kd_model_name", self.loss.kd_model_name, "not a timm model")

    def _clashes(self) -> list[tuple[str, Any, str]]:
        """(key, its value where it clashes with another group's setting, else falsy, the reason), in the order they
        are reported. A table, so that each combination that cannot work is one line with its reason."""
        d, a, m, lc, ck = self.data, self.aug, self.model, self.loss, self.checkpoint
        ray_data, device_aug = d.loader == "ray", d.gpu_decode or d.data_on_device
        device_flag = "--gpu-decode" if d.gpu_decode else "--data-on-device"
        splits = a.aug_splits
        clashes = [
            (
                "checkpoint.recovery_interval",
                ray_data and ck.recovery_interval,
                "Ray Data streams have no resumable position: mid-epoch recovery checkpoints need --loader torch",
            ),
            (
                "aug.aug_repeats",
                ray_data and a.aug_repeats > 1 and a.aug_repeats,
                "Ray Data deals whole blocks to the workers, not repeated samples: --aug-repeats needs --loader torch",
            ),
            # both device paths augment with device_transform.DeviceTransform, which has no PIL-only transforms
            (
                "aug.aa",
                device_aug and a.aa,
                f"auto-augment policies run on PIL images on the CPU: drop --aa or {device_flag}",
            ),
            *(
                (key, device_aug and value, f"not on the {device_flag} path (timm's CPU transforms only)")
                for key, value in (
                    ("aug.grayscale_prob", a.grayscale_prob),
                    ("aug.gaussian_blur_prob", a.gaussian_blur_prob),
                    ("aug.color_jitter_prob", a.color_jitter_prob),
                    ("aug.train_crop_mode", a.train_crop_mode not in (None, "rrc") and a.train_crop_mode),
                )
            ),
            (
                "data.batch_size",
                a.mixing
                and a.mixup_mode in ("batch", "pair")
                and not d.train_batch_sizes  # those replace it for training; validation is never mixed
                and d.batch_size % 2
                and d.batch_size,
                f"mixup/cutmix mode '{a.mixup_mode}' needs an even batch",
            ),
            (
                "data.train_batch_sizes",
                a.mixing
                and a.mixup_mode in ("batch", "pair")
                and any(b % 2 for b in d.train_batch_sizes or [])
                and d.train_batch_sizes,
                f"mixup/cutmix mode '{a.mixup_mode}' needs even batches",
            ),
            (
                "aug.aug_splits",
                d.train_img_sizes and splits > 1 and splits,
                "augmentation splits are not supported with scheduled sizes (--train-img-sizes), as in timm",
            ),
            (
                "loss.jsd_loss",
                lc.jsd_loss and splits < 2,
                "the JSD loss compares --aug-splits views: set --aug-splits 2+",
            ),
            (
                "model.split_bn",
                m.split_bn and splits < 2 and not a.resplit,
                "split BatchNorm needs --aug-splits 2+ (or --resplit)",
            ),
            (
                "aug.aug_splits",
                splits and (d.gpu_decode or d.data_on_device or ray_data) and splits,
                "splits are made by the CPU DataLoader path: not with --gpu-decode, --data-on-device or --loader ray",
            ),
            (
                "loss.jsd_loss",
                splits and lc.bce_loss and lc.jsd_loss,
                "JSD + CE and --bce-loss are two different losses",
            ),
            ("loss.kd_model_name", splits and lc.kd_model_name, "distillation and --aug-splits do not mix"),
        ]
        if d.naflex_loader:  # patch dictionaries, in batches whose size varies with the sequence length
            clashes += [
                (key, value, f"{reason} (--naflex-loader)")
                for key, value, reason in (
                    ("data.loader", ray_data and d.loader, "NaFlex batches are built by the torch DataLoader path"),
                    ("data.gpu_decode", d.gpu_decode, "NaFlex resizes on the CPU, per batch, to a patch budget"),
                    ("aug.aug_repeats", a.aug_repeats > 1 and a.aug_repeats, "not with NaFlex batches (as in timm)"),
                    ("aug.aug_splits", splits, "not with NaFlex batches (as in timm)"),
                    (
                        "aug.cutmix_minmax",
                        a.cutmix_minmax,
                        "NaFlex mixup/cutmix has no min/max box ratio (timm drops it): use --cutmix ALPHA",
                    ),
                    (
                        "aug.mixup_mode",
                        a.mixup_mode != "batch" and a.mixup_mode,
                        "NaFlex mixup/cutmix pairs neighbouring images of a batch; only 'batch' applies",
                    ),
                    ("checkpoint.tta", ck.tta, "flip test-time augmentation needs image tensors, not patches"),
                    ("run.save_images", self.run.save_images, "NaFlex batches are patch sequences, not images"),
                    (
                        "loss.kd_model_name",
                        lc.kd_model_name,
                        "the teacher would need the images the patches came from: distillation and --naflex-loader "
                        "do not mix",
                    ),
                )
            ]
        span = self.scaling.worker_range()
        if span:  # elastic: every update a whole global batch of a resumable order
            elastic = f" (--num-workers {span[0]}:{span[1]})"
            clashes += [
                (key, value, reason + elastic)
                for key, value, reason in (
                    (
                        "data.loader",
                        ray_data and d.loader,
                        "a resize restarts the workers mid-epoch, and Ray Data streams have no resumable position: "
                        "elastic training needs --loader torch",
                    ),
                    ("data.naflex_loader", d.naflex_loader, "NaFlex batches vary in size; elastic training keeps one"),
                    (
                        "data.train_img_sizes",
                        d.train_img_sizes,
                        "scheduled sizes plan each step's batch for a worker count; elastic training changes it",
                    ),
                    (
                        "data.train_batches_per_epoch",
                        d.train_batches_per_epoch,
                        "elastic epochs are whole global batches of the data set",
                    ),
                )
            ]
        if self.scaling.local_mode:  # one worker, this process, its checkpoints renamed into a local run directory
            local = " (--num-workers 0: local mode, this process trains)"
            gpus = (self.scaling.resources_per_worker or {}).get("GPU", 0)
            clashes += [
                (key, value, reason + local)
                for key, value, reason in (
                    ("data.loader", ray_data and d.loader, "Ray Data's input reaches Ray Train workers only"),
                    (
                        "checkpoint.output",
                        is_uri(ck.output or "") and ck.output,
                        "a local run keeps its checkpoints in a local (or mounted) directory; give --num-workers 1 "
                        "to keep them on cloud storage through Ray Train",
                    ),
                    ("scaling.resources_per_worker.GPU", gpus > 1 and gpus, "one process trains on one GPU at most"),
                    (
                        "scaling.placement_strategy",
                        self.scaling.placement_strategy != "PACK" and self.scaling.placement_strategy,
                        "nothing is placed on a cluster",
                    ),
                )
            ]
        return clashes


def timm_model_known(name: str) -> bool:
    import timm  # local: keep `import raytrain_cls.core.config` cheap

    return timm.is_model(name.split(".")[0])


def _check_optimizer(key: str, name: str) -> None:
    from timm.optim import list_optimizers  # local: keep `import raytrain_cls.core.config` cheap

    known = list_optimizers()
    base = name.lower().split("_")[-1] if name.lower().startswith("lookahead_") else name.lower()
    if base not in known:
        raise ConfigError(key, name, f"not a timm optimizer{_suggest(base, known)}")


# ---- field registry ------------------------------------------------------------------------------------------
# `from __future__ import annotations` leaves field types as strings; resolve them once here.
GROUPS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Config).items() if name != "resolved"}
FIELDS: dict[str, tuple[str, dataclasses.Field]] = {}
GROUP_FIELDS: dict[str, list[str]] = {}
for _group, _cls in GROUPS.items():
    GROUP_FIELDS[_group] = []
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELDS, f"duplicate config field {_f.name}"
        FIELDS[_f.name] = (_group, _f)
        GROUP_FIELDS[_group].append(_f.name)


_GROUP_HINTS = {group: typing.get_type_hints(cls) for group, cls in GROUPS.items()}


def _hint(group: str, name: str) -> Any:
    return _GROUP_HINTS[group][name]


def iter_fields() -> Iterator[tuple[str, str, dataclasses.Field, Any]]:
    """(group, name, field, type hint) for every config field, in declaration order."""
    for name, (group, f) in FIELDS.items():
        yield group, name, f, _hint(group, name)


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _torch_has_nvfuser() -> bool:
    import torch

    # From 2.2 on the switch still exists but is a no-op that only warns: the setting would silently do nothing.
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return (major, minor) < (2, 2)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML/CLI value against the field's type; allow only lossless conversions (int -> float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X], or X | Y
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alternative in alternatives[:-1]:  # the first type the value is, else the last one's error
            try:
                return _coerce(key, value, alternative)
            except ConfigError:
                pass
        hint = alternatives[-1]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, value, "expected an integer")
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, value, "expected a finite number")
            return float(value)
        raise ConfigError(key, value, "expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "expected a string")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list):
            raise ConfigError(key, value, "expected a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "expected a mapping")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this module, not in the config


def _check_field(key: str, value: Any, f: dataclasses.Field) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(key, value, f"must be one of {list(meta['choices'])}{_suggest(str(value), meta['choices'])}")
    nargs = meta.get("nargs")
    if isinstance(nargs, int) and isinstance(value, list) and len(value) != nargs:
        raise ConfigError(key, value, f"needs exactly {nargs} values")
    if nargs == "+" and isinstance(value, list) and not value:
        raise ConfigError(key, value, "needs at least one value")
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(key, value, f"must be >= {meta['min']}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise ConfigError(key, value, f"must be > {meta['gt']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(key, value, f"must be <= {meta['max']}")


# ---- files ---------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, a local file or one under a URI (a run's config.yaml on s3://), with the safe loader
    only (no Python object tags, ever)."""
    text = read_text(path)  # None when there is no such file
    if text is None:
        raise ConfigError("--config", str(path), "no such file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("--config", str(path), f"not valid YAML: {yaml_problem(e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--config", str(path), "the file must hold a mapping of keys to values")
    return raw


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own text spans lines and draws a caret)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> str | Path:
    """A YAML file path or URI, or the name of a recipe bundled with the package (e.g. 'digits')."""
    if is_uri(name_or_path):
        return name_or_path
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return path
    recipe = RECIPES_DIR / f"{name_or_path}.yaml"
    if recipe.is_file():
        return recipe
    raise ConfigError(
        "--config",
        name_or_path,
        f"neither a file nor a bundled recipe (recipes: {recipe_names()}){_suggest(name_or_path, recipe_names())}",
    )


def load_config(config: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """Defaults (timm's) <- YAML file or recipe <- overrides (flat or grouped), then validate()."""
    cfg = Config()
    if config:
        cfg.update(read_yaml(resolve_config_path(config)))
    if overrides:
        cfg.update(overrides)
    return cfg.validate()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
