"""raytrain_cls.core.config: timm's defaults, the three spellings of a config, and every ConfigError path."""

from __future__ import annotations

import contextlib
import math

import pytest
import yaml

from raytrain_cls.core.config import (
    FIELDS,
    GROUPS,
    RECIPES_DIR,
    Config,
    ConfigError,
    Resolved,
    _coerce,
    dump_yaml,
    iter_fields,
    load_config,
    read_yaml,
    recipe_names,
    resolve_config_path,
)

RESOLVED = dict(
    use_gpu=False,
    num_workers=2,
    lr=0.2,
    lr_rule="--lr",
    num_epochs=3,
    num_classes=10,
    classes=[str(i) for i in range(10)],
    train_samples=1438,
    val_samples=359,
    data_config={"input_size": [3, 32, 32]},
)


def valid(**flat) -> Config:
    """A config that passes validate() (built-in digits data) with ``flat`` applied on top, validated."""
    return Config().update({"dataset": "digits", **flat}).validate()


@contextlib.contextmanager
def raises(key: str, *fragments: str):
    """Expect a ConfigError naming ``key`` whose message holds every fragment."""
    with pytest.raises(ConfigError) as info:
        yield info
    err = info.value
    assert err.key == key, f"wrong key: {err.key!r} (message: {err})"
    for fragment in fragments:
        assert fragment in str(err), f"{fragment!r} missing from {str(err)!r}"


# ---- defaults ------------------------------------------------------------------------------------------------
TIMM_TRAIN_PY_DEFAULTS = {
    # timm/train.py's argparse defaults (huggingface/pytorch-image-models, main branch).
    "dataset": "",
    "data_dir": None,
    "train_split": "train",
    "val_split": "validation",
    "batch_size": 128,
    "validation_batch_size": None,
    "train_img_sizes": None,
    "train_batch_sizes": None,
    "train_size_probs": None,
    "train_size_schedule": "constant",
    "train_size_schedule_spread": 0.65,
    "train_size_random_mix": 0.1,
    "train_batches_per_epoch": None,
    "variable_batch_loss_scale": "none",
    "workers": 4,
    "pin_mem": False,
    "no_aug": False,
    "scale": [0.08, 1.0],
    "ratio": [3.0 / 4.0, 4.0 / 3.0],
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.4,
    "aa": None,
    "train_interpolation": "random",
    "reprob": 0.0,
    "remode": "pixel",
    "recount": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "cutmix_minmax": None,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "mixup_off_epoch": 0,
    "model": "resnet50",
    "pretrained": False,
    "num_classes": None,
    "gp": None,
    "img_size": None,
    "in_chans": None,
    "input_size": None,
    "crop_pct": None,
    "mean": None,
    "std": None,
    "interpolation": "",
    "drop": 0.0,
    "drop_path": None,
    "channels_last": False,
    "model_kwargs": {},
    "opt": "sgd",
    "opt_eps": None,
    "opt_betas": None,
    "momentum": 0.9,
    "weight_decay": 2e-5,
    "clip_grad": None,
    "clip_mode": "norm",
    "lr": None,
    "lr_base": 0.1,
    "lr_base_size": 256,
    "lr_base_scale": "",
    "grad_accum_steps": 1,
    "sched": "cosine",
    "epochs": 300,
    "warmup_epochs": 5,
    "warmup_lr": 1e-5,
    "warmup_prefix": False,
    "min_lr": 0.0,
    "cooldown_epochs": 0,
    "decay_epochs": 90,
    "decay_milestones": [90, 180, 270],
    "decay_rate": 0.1,
    "patience_epochs": 10,
    "lr_noise": None,
    "lr_noise_pct": 0.67,
    "lr_noise_std": 1.0,
    "lr_cycle_mul": 1.0,
    "lr_cycle_decay": 0.5,
    "lr_cycle_limit": 1,
    "lr_k_decay": 1.0,
    "sched_on_updates": False,
    "smoothing": 0.1,
    "bce_loss": False,
    "bce_target_thresh": None,
    "model_ema": False,
    "model_ema_decay": 0.9998,
    "model_ema_force_cpu": False,
    "amp": False,
    "amp_dtype": "float16",
    "output": "",
    "experiment": "",
    "checkpoint_hist": 10,
    "eval_metric": "top1",
    "seed": 42,
    "log_interval": 50,
}


@pytest.mark.parametrize("name,expected", sorted(TIMM_TRAIN_PY_DEFAULTS.items()))
def test_default_matches_timm_train_py(name, expected):
    """Each field's default is timm train.py's, so a timm user's expectations hold without a recipe."""
    assert Config().get(name) == expected


def test_defaults_are_fresh_per_instance():
    """Mutable defaults (lists, dicts) are not shared between Config instances."""
    a, b = Config(), Config()
    a.aug.scale.append(9.0)
    a.model.model_kwargs["x"] = 1
    assert b.aug.scale == [0.08, 1.0] and b.model.model_kwargs == {}


def test_field_names_are_unique_and_grouped():
    """Every field lives in exactly one group, so flat keys are unambiguous."""
    names = [name for _, name, _, _ in iter_fields()]
    assert len(names) == len(set(names)) == len(FIELDS)
    assert set(GROUPS) == {
        "data",
        "aug",
        "model",
        "optim",
        "sched",
        "loss",
        "ema",
        "precision",
        "checkpoint",
        "run",
        "scaling",
    }


# ---- update: grouped and flat --------------------------------------------------------------------------------
def test_update_accepts_grouped_yaml():
    cfg = Config().update({"optim": {"lr": 0.5, "opt": "adamw"}, "data": {"batch_size": 16}})
    assert (cfg.optim.lr, cfg.optim.opt, cfg.data.batch_size) == (0.5, "adamw", 16)


def test_update_accepts_flat_timm_args_yaml():
    cfg = Config().update({"lr": 0.5, "opt": "adamw", "batch_size": 16, "smoothing": 0.0})
    assert (cfg.optim.lr, cfg.optim.opt, cfg.data.batch_size, cfg.loss.smoothing) == (0.5, "adamw", 16, 0.0)


def test_update_group_name_that_is_also_a_field():
    """'model' and 'sched' are both a group and a field: a string sets the field, a mapping the group."""
    cfg = Config().update({"model": "resnet18", "sched": "step"})
    assert cfg.model.model == "resnet18" and cfg.sched.sched == "step"
    cfg.update({"model": {"model": "resnet34", "drop": 0.2}, "sched": {"sched": "poly"}})
    assert (cfg.model.model, cfg.model.drop, cfg.sched.sched) == ("resnet34", 0.2, "poly")


def test_update_converts_losslessly():
    """int -> float, integral float -> int, scalar -> one-element list, tuple -> list."""
    cfg = Config().update({"lr": 1, "epochs": 3.0, "mean": 0.5, "scale": (0.2, 1)})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.sched.epochs == 3 and isinstance(cfg.sched.epochs, int)
    assert cfg.model.mean == [0.5]
    assert cfg.aug.scale == [0.2, 1.0] and all(isinstance(v, float) for v in cfg.aug.scale)


def test_update_optional_accepts_none():
    cfg = Config().update({"lr": 0.3}).update({"lr": None})
    assert cfg.optim.lr is None


def test_resolved_is_a_typed_record_that_round_trips_through_config_yaml():
    cfg = Config().update({"resolved": dict(RESOLVED)})
    assert isinstance(cfg.resolved, Resolved) and cfg.resolved.lr == 0.2 and cfg.resolved.run_dir is None
    again = Config.from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again.resolved == cfg.resolved
    assert Config().update({"resolved": {}}).resolved is None  # nothing resolved yet


@pytest.mark.parametrize("change, key", [(dict(num_workerz=2), "resolved.num_workerz"), ("drop lr", "resolved.lr")])
def test_a_resolved_record_with_unknown_or_missing_keys_is_refused_by_name(change, key):
    raw = dict(RESOLVED)
    if change == "drop lr":
        del raw["lr"]
    else:
        raw.update(change)
    with pytest.raises(ConfigError) as e:
        Config().update({"resolved": raw})
    assert e.value.key == key


# ---- dict / YAML round trip ----------------------------------------------------------------------------------
def _non_default() -> Config:
    return Config().update(
        {
            "dataset": "digits",
            "lr": 0.25,
            "scale": [0.3, 0.9],
            "model_kwargs": {"a": 1},
            "resources_per_worker": {"CPU": 2},
            "mean": [0.1, 0.2, 0.3],
            "use_gpu": False,
            "decay_milestones": [3, 7],
            "resolved": {**RESOLVED, "lr": 0.25, "num_epochs": 12},
        }
    )


def test_to_dict_from_dict_round_trip():
    cfg = _non_default()
    raw = cfg.to_dict()
    assert set(raw) == set(GROUPS) | {"resolved"}
    assert raw["optim"]["lr"] == 0.25 and raw["resolved"]["lr"] == 0.25 and raw["resolved"]["num_epochs"] == 12
    assert Config.from_dict(raw) == cfg
    assert Config.from_dict(raw) != Config()


def test_dump_yaml_round_trip():
    import yaml

    cfg = _non_default()
    assert Config.from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


# ---- files, recipes, load_config -----------------------------------------------------------------------------
def test_load_config_file_then_overrides(tmp_path):
    """Defaults <- YAML file <- overrides: the overrides win, untouched keys keep the file's value."""
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: digits\n  batch_size: 16\noptim:\n  lr: 0.2\n  opt: adamw\n")
    cfg = load_config(str(path), {"lr": 0.7, "sched": {"epochs": 9}})
    assert (cfg.optim.lr, cfg.sched.epochs) == (0.7, 9)
    assert (cfg.data.batch_size, cfg.optim.opt) == (16, "adamw")
    assert cfg.model.model == "resnet50"  # timm default, not set anywhere


def test_load_config_validates(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\n")
    with raises("optim.lr", "-1", "must be > 0"):
        load_config(str(path), {"lr": -1})


def test_bundled_digits_recipe():
    assert "digits" in recipe_names()
    assert resolve_config_path("digits") == RECIPES_DIR / "digits.yaml"
    cfg = load_config("digits")
    assert cfg.data.dataset == "digits"
    assert cfg == Config().update(read_yaml(RECIPES_DIR / "digits.yaml"))  # the recipe, on top of the defaults
    assert cfg != Config().update({"dataset": "digits"})


def test_every_bundled_recipe_validates():
    for name in recipe_names():
        load_config(name)


def test_resolve_config_path_prefers_paths(tmp_path):
    """A name with a YAML suffix or a slash is a path even before it exists (read_yaml then says 'no such file')."""
    assert resolve_config_path("missing.yaml").name == "missing.yaml"
    assert str(resolve_config_path("some/dir/run")) == "some/dir/run"
    existing = tmp_path / "digits"  # a file named like a recipe wins over the recipe
    existing.write_text("lr: 0.3\n")
    assert resolve_config_path(str(existing)) == existing


def test_resolve_config_path_unknown_recipe():
    with raises("--config", "digitz", "neither a file nor a bundled recipe", "did you mean 'digits'"):
        resolve_config_path("digitz")


def test_read_yaml_missing_file(tmp_path):
    with raises("--config", "no such file", str(tmp_path / "nope.yaml")):
        read_yaml(tmp_path / "nope.yaml")


def test_read_yaml_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: 0.1\n")
    with raises("--config", "not valid YAML"):
        read_yaml(path)


def test_read_yaml_list_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- 0.1\n")
    with raises("--config", "must hold a mapping"):
        read_yaml(path)


def test_read_yaml_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert read_yaml(path) == {}


def test_read_yaml_refuses_python_tags(tmp_path):
    """safe_load only: a !!python tag never constructs an object or runs code."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with raises("--config", "not valid YAML"):
        read_yaml(path)
    path.write_text("lr: !!python/object:collections.OrderedDict {}\n")
    with raises("--config", "not valid YAML"):
        read_yaml(path)
    assert not marker.exists()


def test_load_config_non_finite_from_yaml(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("dataset: digits\nlr: .nan\n")
    with raises("optim.lr", "expected a finite number"):
        load_config(str(path))


# ---- update(): unknown keys ----------------------------------------------------------------------------------
def test_unknown_flat_key_suggests():
    with raises("lrr", "unknown key", "did you mean 'lr'"):
        Config().update({"lrr": 1})


def test_unknown_grouped_key_suggests():
    with raises("optim.lrr", "unknown key", "did you mean 'lr'"):
        Config().update({"optim": {"lrr": 1}})


def test_field_in_the_wrong_group():
    """A real field under the wrong group is refused, not silently moved."""
    with raises("optim.epochs", "unknown key"):
        Config().update({"optim": {"epochs": 3}})


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError) as info:
        Config().update({"zzzzqqq": 1})
    assert info.value.key == "zzzzqqq" and "did you mean" not in str(info.value)


def test_update_needs_a_mapping():
    with raises("<config>", "expected a mapping"):
        Config().update([("lr", 0.1)])


def test_resolved_must_be_a_mapping():
    with raises("resolved", "expected a mapping"):
        Config().update({"resolved": [1]})


# ---- _coerce: types ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,key,reason",
    [
        ({"epochs": "3"}, "sched.epochs", "expected an integer"),
        ({"epochs": True}, "sched.epochs", "expected an integer"),
        ({"epochs": 1.5}, "sched.epochs", "expected an integer"),
        ({"batch_size": None}, "data.batch_size", "expected an integer"),
        ({"lr": "0.1x"}, "optim.lr", "expected a number"),
        ({"hflip": True}, "aug.hflip", "expected a number"),
        ({"lr": float("nan")}, "optim.lr", "expected a finite number"),
        ({"weight_decay": float("inf")}, "optim.weight_decay", "expected a finite number"),
        ({"amp": "yes"}, "precision.amp", "expected true or false"),
        ({"amp": 1}, "precision.amp", "expected true or false"),
        ({"opt": 3}, "optim.opt", "expected a string"),
        ({"scale": "big"}, "aug.scale", "expected a list"),
        ({"scale": {"lo": 0.1}}, "aug.scale", "expected a list"),
        ({"scale": [0.1, "x"]}, "aug.scale[1]", "expected a number"),
        ({"decay_milestones": [10, 2.5]}, "sched.decay_milestones[1]", "expected an integer"),
        ({"model_kwargs": ["a=1"]}, "model.model_kwargs", "expected a mapping"),
        ({"resources_per_worker": 4}, "scaling.resources_per_worker", "expected a mapping"),
        ({"optim": {"momentum": "high"}}, "optim.momentum", "expected a number"),
    ],
)
def test_wrong_type(raw, key, reason):
    """Wrong types fail at update() time, naming the dotted key (with the list index for elements)."""
    with raises(key, reason):
        Config().update(raw)


def test_wrong_type_message_has_the_value():
    with pytest.raises(ConfigError) as info:
        Config().update({"epochs": "three"})
    assert info.value.value == "three" and "'three'" in str(info.value)


def test_coerce_unsupported_type_is_a_programming_error():
    with pytest.raises(TypeError, match="unsupported config type"):
        _coerce("x", 1, complex)


# ---- validate(): per-field bounds, choices, nargs ------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,key,reason",
    [
        ({"batch_size": 0}, "data.batch_size", "must be >= 1"),
        ({"workers": -1}, "data.workers", "must be >= 0"),
        ({"max_failures": -2}, "checkpoint.max_failures", "must be >= -1"),
        ({"lr": 0}, "optim.lr", "must be > 0"),
        ({"lr": -1}, "optim.lr", "must be > 0"),
        ({"crop_pct": 0.0}, "model.crop_pct", "must be > 0"),
        ({"crop_pct": 1.2}, "model.crop_pct", "must be <= 1"),
        ({"hflip": 1.5}, "aug.hflip", "must be <= 1"),
        ({"smoothing": 1.01}, "loss.smoothing", "must be <= 1"),
        ({"model_ema_decay": 0}, "ema.model_ema_decay", "must be > 0"),
    ],
)
def test_out_of_range(raw, key, reason):
    with raises(key, reason, repr(next(iter(raw.values())))):
        valid(**raw)


@pytest.mark.parametrize(
    "raw,key,suggestion",
    [
        ({"sched": "cosin"}, "sched.sched", "cosine"),
        ({"mixup_mode": "elm"}, "aug.mixup_mode", "elem"),
        ({"eval_metric": "top_1"}, "checkpoint.eval_metric", "top1"),
        ({"amp_dtype": "bfloat"}, "precision.amp_dtype", "bfloat16"),
        ({"clip_mode": "norms"}, "optim.clip_mode", "norm"),
    ],
)
def test_choices_with_suggestion(raw, key, suggestion):
    with raises(key, "must be one of", f"did you mean '{suggestion}'"):
        valid(**raw)


@pytest.mark.parametrize(
    "raw,key,n",
    [
        ({"scale": [0.5]}, "aug.scale", 2),
        ({"ratio": [0.5, 1.0, 2.0]}, "aug.ratio", 2),
        ({"cutmix_minmax": [0.2]}, "aug.cutmix_minmax", 2),
        ({"input_size": [3, 32]}, "model.input_size", 3),
    ],
)
def test_nargs_count(raw, key, n):
    with raises(key, f"needs exactly {n} values"):
        valid(**raw)


def test_valid_config_passes_and_returns_self():
    cfg = Config().update({"dataset": "digits"})
    assert cfg.validate() is cfg


# ---- validate(): cross-field checks --------------------------------------------------------------------------
def test_unknown_dataset_suggests():
    with raises("data.dataset", "digitz", "unknown data set", "did you mean 'digits'"):
        valid(dataset="digitz")


@pytest.mark.parametrize("alias", ["fashion-mnist", "torch/fashion_mnist", "sklearn/digits", "DIGITS"])
def test_dataset_aliases_are_accepted(alias):
    valid(dataset=alias)


def test_folder_needs_data_dir():
    """timm's default dataset ('') is an ImageFolder and needs --data-dir."""
    with raises("data.data_dir", "needs --data-dir"):
        Config().validate()
    with raises("data.data_dir", "needs --data-dir"):
        valid(dataset="imagefolder")
    valid(dataset="folder", data_dir="/somewhere")


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"scale": [0.9, 0.1]}, "aug.scale"),
        ({"scale": [0.0, 1.0]}, "aug.scale"),
        ({"ratio": [1.5, 0.5]}, "aug.ratio"),
        ({"ratio": [-1.0, 1.0]}, "aug.ratio"),
        ({"cutmix_minmax": [0.8, 0.2]}, "aug.cutmix_minmax"),
    ],
)
def test_pair_ordering(raw, key):
    with raises(key, "needs 0 < low <= high"):
        valid(**raw)


def test_scale_above_one():
    with raises("aug.scale", "[0.5, 1.5]", "high <= 1"):
        valid(scale=[0.5, 1.5])


@pytest.mark.parametrize("mixing", [{"mixup": 0.2}, {"cutmix": 1.0}, {"cutmix_minmax": [0.2, 0.8]}])
def test_odd_batch_with_batch_mode_mixing(mixing):
    with raises("data.batch_size", "33", "needs an even batch"):
        valid(batch_size=33, **mixing)
    with raises("data.batch_size", "'pair'"):
        valid(batch_size=33, mixup_mode="pair", **mixing)
    valid(batch_size=33, mixup_mode="elem", **mixing)
    valid(batch_size=34, **mixing)


def test_odd_batch_without_mixing_is_fine():
    valid(batch_size=33)


def test_pretrained_needs_a_local_file():
    with raises("model.pretrained", "--pretrained-path"):
        valid(pretrained=True)


def test_pretrained_path_must_exist(tmp_path):
    missing = str(tmp_path / "w.safetensors")
    with raises("model.pretrained_path", missing, "no such file"):
        valid(pretrained=True, pretrained_path=missing)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    valid(pretrained=True, pretrained_path=missing)
    valid(pretrained_path="s3://bucket/w.safetensors")  # URIs are not checked on the driver


def test_input_size_positive():
    with raises("model.input_size", "[3, 0, 32]", "three positive numbers"):
        valid(input_size=[3, 0, 32])


@pytest.mark.parametrize(
    "raw,key,chans",
    [
        ({"mean": [0.5, 0.5]}, "model.mean", 3),
        ({"std": [0.5, 0.5]}, "model.std", 3),
        ({"mean": []}, "model.mean", 3),
        ({"mean": [0.5, 0.5, 0.5], "in_chans": 1}, "model.mean", 1),
        ({"std": [0.5, 0.5, 0.5], "input_size": [1, 28, 28]}, "model.std", 1),
        ({"mean": [0.5, 0.5, 0.5], "input_size": [4, 28, 28]}, "model.mean", 4),
    ],
)
def test_mean_std_length(raw, key, chans):
    if not raw.get("mean", [0]):
        expected = "needs at least one value"
    else:
        expected = "needs 1 value" if chans == 1 else f"needs 1 or {chans} values"
    with raises(key, expected):
        valid(**raw)


def test_mean_std_lengths_that_fit():
    valid(mean=[0.5], std=[0.2])
    valid(mean=[0.1, 0.2, 0.3], std=[0.2, 0.2, 0.2])
    valid(mean=[0.1, 0.2, 0.3, 0.4], in_chans=4)


@pytest.mark.parametrize("std", [[0.5, 0.0, 0.5], [-0.1]])
def test_std_positive(std):
    with raises("model.std", "every std must be > 0"):
        valid(std=std)


@pytest.mark.parametrize("betas", [[0.9, 1.0], [-0.1, 0.99]])
def test_opt_betas_range(betas):
    with raises("optim.opt_betas", "[0, 1)"):
        valid(opt="adamw", opt_betas=betas)


def test_unknown_timm_optimizer_suggests():
    with raises("optim.opt", "adamww", "not a timm optimizer", "did you mean 'adamw'"):
        valid(opt="adamww")


@pytest.mark.parametrize("opt", ["adamw", "momentum", "lamb", "lion", "AdamW", "lookahead_adamw"])
def test_known_timm_optimizers(opt):
    valid(opt=opt)


def test_multistep_milestones_increasing():
    with raises("sched.decay_milestones", "[30, 10]", "must be strictly increasing"):
        valid(sched="multistep", decay_milestones=[30, 10], epochs=40)
    with raises("sched.decay_milestones", "[10, 10]", "must be strictly increasing"):
        valid(sched="multistep", decay_milestones=[10, 10], epochs=40)
    valid(sched="multistep", decay_milestones=[10, 30], epochs=40)
    valid(sched="step", decay_milestones=[30, 10], epochs=40)  # only multistep reads them


@pytest.mark.parametrize("value", [-1, "4", True, None])
def test_resources_per_worker_values(value):
    with raises("scaling.resources_per_worker.CPU", "must be a number >= 0"):
        valid(resources_per_worker={"CPU": value})


def test_resources_per_worker_valid():
    cfg = valid(resources_per_worker={"CPU": 2, "GPU": 0.5, "custom": 0})
    assert cfg.scaling.resources_per_worker == {"CPU": 2, "GPU": 0.5, "custom": 0}


def test_first_problem_is_reported_with_its_value():
    """validate() stops at the first problem; ConfigError keeps key, value and reason as attributes."""
    with pytest.raises(ConfigError) as info:
        valid(lr=-0.5)
    err = info.value
    assert (err.key, err.value) == ("optim.lr", -0.5) and err.reason == "must be > 0"
    assert str(err) == "config error: optim.lr = -0.5: must be > 0"
    assert isinstance(err, ValueError)


def test_validate_rechecks_bounds_after_direct_assignment():
    """Direct attribute assignment skips _coerce; validate() still checks the bounds it can."""
    cfg = Config().update({"dataset": "digits"})
    cfg.optim.lr = -math.inf
    with raises("optim.lr", "must be > 0"):
        cfg.validate()


@pytest.mark.parametrize(
    "raw,key", [({"lr_noise": []}, "sched.lr_noise"), ({"opt": "adamw", "opt_betas": []}, "optim.opt_betas")]
)
def test_empty_list_for_one_or_more_values(raw, key):
    with raises(key):
        valid(**raw)


def test_a_yaml_section_with_everything_commented_out_is_empty(tmp_path):
    """`aug:` followed only by comments loads as None: it means "no overrides", not an unknown key."""
    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: digits}\naug:\n  # mixup: 0.2\noptim:\n  lr: 0.5\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == 0.5 and cfg.aug.mixup == 0.0


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `lr: 1e-4` as the string '1e-4'; a timm user means the number."""
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\nlr: 1e-4\nweight_decay: 5E-5\nscale: [8e-2, 1]\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-5 and cfg.aug.scale == [0.08, 1.0]
    with pytest.raises(ConfigError):
        load_config(str(path), {"lr": "fast"})


# ---- validation per group ------------------------------------------------------------------------------------
def test_each_group_checks_itself_without_the_others():
    from raytrain_cls.core.config import GROUPS, AugConfig, DataConfig, SchedConfig

    for name, group in GROUPS.items():
        (group(dataset="digits") if name == "data" else group()).check()  # defaults pass (an ImageFolder needs a dir)
    with pytest.raises(ConfigError, match="unknown data set"):
        DataConfig(dataset="cifar").check()
    with pytest.raises(ConfigError, match="strictly increasing"):
        SchedConfig(sched="multistep", decay_milestones=[30, 10]).check()
    with pytest.raises(ConfigError) as e:
        AugConfig(aug_splits=2, mixup=0.2).check()
    assert e.value.key == "aug.aug_splits"


def test_cross_group_clashes_are_one_table_and_off_by_default():
    cfg = load_config("digits", {})
    assert all(not value for _, value, _ in cfg._clashes())
    clashing = load_config("digits", {}).update({"mixup": 0.2, "batch_size": 31})
    assert [key for key, value, _ in clashing._clashes() if value] == ["data.batch_size"]
