"""RunFacts (core/facts.py): the keys a Tune trial may change and still take its search's facts must be keys the
checks before Ray never read. Traced, not listed: every config read the checks make is recorded here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raytrain_cls.core.config import GROUPS, Config, load_config
from raytrain_cls.core.facts import FACT_FREE_KEYS, RunFacts
from raytrain_cls.run.preflight import preflight

JOBS = Path(__file__).parents[2] / "jobs"

# Configs whose checks take different paths: plain, mixing on, RandAugment + random erasing, scheduled image sizes,
# and each LR schedule (with cooldown, warmup prefix, cycles) for the schedule's length.
TRACED = [
    ("digits", {}),
    ("digits", {"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 0.5, "smoothing": 0.2}),
    ("digits", {"aa": "rand-m9-mstd0.5", "reprob": 0.25, "model_ema": True}),
    (str(JOBS / "digits_progressive.yaml"), {}),
    ("digits", {"sched": "cosine", "cooldown_epochs": 2, "warmup_epochs": 1, "warmup_prefix": True}),
    ("digits", {"sched": "step", "decay_epochs": 2}),
    ("digits", {"sched": "multistep", "decay_milestones": [2, 4]}),
    ("digits", {"sched": "plateau", "patience_epochs": 1}),
    ("digits", {"sched": "poly", "lr_cycle_limit": 2}),
    ("digits", {"sched": "tanh"}),
    ("digits", {"sched": "none"}),
]


@pytest.fixture
def reads(monkeypatch) -> set[str]:
    """The names read from any config group while the test runs (fields, and the properties built on them)."""
    seen: set[str] = set()
    for group in GROUPS.values():

        def recording(self, name, _read=group.__getattribute__):
            seen.add(name)
            return _read(self, name)

        monkeypatch.setattr(group, "__getattribute__", recording)
    return seen


@pytest.mark.parametrize("recipe, overrides", TRACED, ids=[f"{r.split('/')[-1]}-{o}" for r, o in TRACED])
def test_the_checks_before_ray_never_read_a_fact_free_key(recipe, overrides, reads):
    cfg = load_config(recipe, overrides)
    reads.clear()
    facts = preflight(cfg).facts
    assert facts.num_classes == 10 and facts.train_samples > 0
    assert "model" in reads and "dataset" in reads  # the tracing sees the checks' reads
    assert not reads & FACT_FREE_KEYS, sorted(reads & FACT_FREE_KEYS)


def test_a_trial_that_changes_fact_free_keys_resolves_as_its_own_checks_would():
    """The same Resolved, field by field, from the base config's facts as from the trial's own checks."""
    from raytrain_cls.run.driver import resolve

    base = load_config("digits", {})
    facts = preflight(base).facts
    changed = {"lr": 0.03, "weight_decay": 1e-3, "mixup": 0.4, "smoothing": 0.0, "model_ema_decay": 0.99}
    assert facts.hold_for(changed, elastic=False)
    trial = base.copy().update(changed)
    with_facts = resolve(trial.copy(), {"CPU": 2.0}, facts).resolved
    own = resolve(trial.copy(), {"CPU": 2.0}).resolved
    assert with_facts == own


@pytest.mark.parametrize(
    "changed, elastic, holds",
    [
        ({"lr": 0.1, "mixup": 0.2}, False, True),
        ({}, False, True),
        ({"lr": 0.1, "epochs": 3}, False, False),  # the schedule's length
        ({"model": "resnet18"}, False, False),
        ({"batch_size": 16}, False, False),
        ({"opt": "adamw"}, False, False),  # a name for timm's registry, looked up by the trial
        ({"lr": 0.1}, True, False),  # an elastic trial checks every worker count's batch itself
    ],
)
def test_facts_hold_only_for_fact_free_keys_of_a_fixed_size_run(changed, elastic, holds):
    facts = RunFacts(10, list("0123456789"), 100, 20, {"input_size": [1, 8, 8]}, 4)
    assert facts.hold_for(changed, elastic=elastic) is holds


def test_a_config_validates_without_timm_when_its_registry_names_are_vouched_for():
    """validate(registries=False) never imports timm (a Ray Train trial's process); validate() looks the optimizer
    up, and the search's own validation does it for the trials."""
    probe = (
        "import sys\n"
        "from raytrain_cls.core.config import Config\n"
        "cfg = Config()\n"
        "cfg.update({'dataset': 'digits', 'opt': 'adamw', 'lr': 0.01})\n"
        "cfg.validate(registries=False)\n"
        "light = 'timm' not in sys.modules\n"
        "cfg.validate()\n"
        "print(light, 'timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True"]


def test_registry_names_are_still_checked_by_default():
    from raytrain_cls.core.config import ConfigError

    cfg = Config()
    cfg.update({"dataset": "digits", "opt": "adamx"})
    cfg.validate(registries=False)  # no lookup: a trial whose search looked this name up already
    with pytest.raises(ConfigError, match="not a timm optimizer"):
        cfg.validate()
