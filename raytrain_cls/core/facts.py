"""What the checks before Ray find out about a run's data and model, as plain values (``RunFacts``), and which
config keys they never read.

Finding them takes the data set and timm: the model built on the meta device (its default input size and
normalisation), timm's scheduler for the schedule's true length (run/preflight.py). A Tune search finds its base
config's facts once and hands them to its trials; a trial whose searched keys the checks never read resolves with
them, and its process then never imports timm (about a sixth of a Ray Train trial's fixed cost on the 2-core
machine: docs/benchmarks.md). Any other trial runs the checks itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Config keys that none of the checks before Ray reads (neither the data source, the model on the meta device, the
# data config, the transforms, the teacher, nor the schedule's length): the keys a search most often tunes.
# tests/unit/test_facts.py traces every read the checks make and fails when one of these is read.
FACT_FREE_KEYS = frozenset(
    {
        # optimizer: the LR itself is resolved per trial (driver.resolve); the optimizer's name is not here
        "lr",
        "lr_base",
        "weight_decay",
        "momentum",
        "opt_eps",
        "opt_betas",
        "clip_grad",
        # mixing and the loss
        "mixup",
        "cutmix",
        "mixup_prob",
        "mixup_switch_prob",
        "smoothing",
        # weight averaging
        "model_ema_decay",
    }
)


@dataclass(frozen=True)
class RunFacts:
    """The run-wide values the checks before Ray found, which driver.resolve records in the config's Resolved."""

    num_classes: int
    classes: list[str]
    train_samples: int
    val_samples: int
    data_config: dict  # timm's resolve_data_config, as plain lists: input_size, mean, std, crop_pct, ...
    num_epochs: int  # the schedule's true length: epochs + cooldown (+ warmup with --warmup-prefix)
    extra: dict = field(default_factory=dict)  # Resolved fields only some runs have (naflex_patch_size)

    def hold_for(self, changed: Iterable[str], elastic: bool) -> bool:
        """Whether these facts, found for a base config, are also a config's that differs from it in the keys
        ``changed`` (a Tune trial's searched values). An elastic run's checks read its batch and mixing settings for
        every worker count, so its facts are never taken over."""
        return not elastic and all(key in FACT_FREE_KEYS for key in changed)
