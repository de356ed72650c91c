"""raytrain_cls.commands.cli: flags made from the config fields, recipe choice, usage errors before any Ray work."""

from __future__ import annotations

import typing

import pytest

from raytrain_cls.commands.cli import EXIT_USAGE, base_recipe, build_parser, main, overrides_of
from raytrain_cls.core.config import Config, iter_fields, recipe_names


def parse(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_parses_timm_style_flags():
    """Long and short (timm) flags, BooleanOptionalAction, nargs lists and KEY=VALUE dicts all parse to typed values."""
    args = parse(
        "--lr",
        "0.5",
        "-b",
        "16",
        "--no-amp",
        "--scale",
        "0.2",
        "1.0",
        "--model-kwargs",
        "a=1",
        "b=x",
        "--use-gpu",
        "--num-workers",
        "3",
        "-j",
        "2",
    )
    assert args.command == "train"
    assert args.lr == 0.5 and isinstance(args.lr, float)
    assert args.batch_size == 16 and isinstance(args.batch_size, int)
    assert args.amp is False
    assert args.scale == [0.2, 1.0]
    assert args.model_kwargs == {"a": 1, "b": "x"}
    assert args.use_gpu is True
    assert args.num_workers == 3 and args.workers == 2


def test_overrides_hold_only_given_flags():
    """Defaults are SUPPRESSed: a flag not on the command line never overrides the recipe or YAML."""
    args = parse(
        "--lr",
        "0.5",
        "-b",
        "16",
        "--no-amp",
        "--scale",
        "0.2",
        "1.0",
        "--model-kwargs",
        "a=1",
        "b=x",
        "--use-gpu",
        "--num-workers",
        "3",
        "-j",
        "2",
    )
    assert overrides_of(args) == {
        "lr": 0.5,
        "batch_size": 16,
        "amp": False,
        "scale": [0.2, 1.0],
        "model_kwargs": {"a": 1, "b": "x"},
        "use_gpu": True,
        "num_workers": 3,
        "workers": 2,
    }
    assert overrides_of(parse()) == {}
    assert overrides_of(parse("-c", "digits")) == {}
    assert overrides_of(parse("-c", "digits", "--resume", "runs/a")) == {"resume": "runs/a"}


def test_other_short_flags():
    args = parse("-vb", "64", "-c", "my.yaml", "--resume", "runs/a", "--no-resume-opt")
    assert args.validation_batch_size == 64 and args.config == "my.yaml" and args.resume == "runs/a"
    assert args.no_resume_opt is True


def test_model_kwargs_value_needs_equals():
    with pytest.raises(SystemExit) as info:
        parse("--model-kwargs", "novalue")
    assert info.value.code == 2


def _sample_argv(name: str, f, hint) -> tuple[list[str], object]:
    """Command-line words that set field ``name`` and the Python value they must produce."""
    flag = f"--{name.replace('_', '-')}"
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    if hint is bool:
        return [flag], True
    if origin is list:
        n = f.metadata.get("nargs")
        n = n if isinstance(n, int) else 3
        if typing.get_args(hint)[0] is int:
            return [flag, *[str(i + 1) for i in range(n)]], [i + 1 for i in range(n)]
        if typing.get_args(hint)[0] is str:
            return [flag, *[f"word{i}" for i in range(n)]], [f"word{i}" for i in range(n)]
        return [flag, *["0.5"] * n], [0.5] * n
    if hint is dict or origin is dict:
        return [flag, "k=2", "s=abc"], {"k": 2, "s": "abc"}
    if hint is int:
        return [flag, "3"], 3
    if hint is float:
        return [flag, "0.5"], 0.5
    choices = f.metadata.get("choices")
    value = choices[-1] if choices else "some_text"
    return [flag, value], value


@pytest.mark.parametrize("group,name,f,hint", list(iter_fields()), ids=[n for _, n, _, _ in iter_fields()])
def test_every_field_has_a_flag(group, name, f, hint):
    """Each config field is settable from the command line, and the parsed value is accepted by Config.update."""
    argv, expected = _sample_argv(name, f, hint)
    args = parse(*argv)
    assert overrides_of(args) == {name: expected}
    cfg = Config().update(overrides_of(args))
    assert cfg.get(name) == expected


def test_negated_bool_flags():
    """Every bool field has --no-FLAG (except fields already named no_*, which are plain switches)."""
    for _, name, _, hint in iter_fields():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        if base is bool and not name.startswith("no_"):
            assert overrides_of(parse(f"--no-{name.replace('_', '-')}")) == {name: False}


def test_no_aug_is_a_plain_switch():
    assert overrides_of(parse("--no-aug")) == {"no_aug": True}
    with pytest.raises(SystemExit):
        parse("--no-no-aug")


def test_choices_are_not_enforced_by_argparse_but_by_validate():
    """Choice errors come from validate() (with a suggestion), so argparse accepts the string as is."""
    assert parse("--sched", "cosin").sched == "cosin"


# ---- base recipe ---------------------------------------------------------------------------------------------
def test_base_recipe_default_is_digits():
    assert base_recipe(parse()) == "digits"


@pytest.mark.parametrize("dataset", ["fashion_mnist", "fashion-mnist", "torch/fashion_mnist"])
def test_base_recipe_fashion_mnist(dataset):
    """--dataset fashion_mnist starts from its bundled recipe (aliases included)."""
    assert "fashion_mnist" in recipe_names()
    assert base_recipe(parse("--dataset", dataset)) == "fashion_mnist"


def test_base_recipe_image_folder_uses_timm_defaults():
    assert base_recipe(parse("--data-dir", "/data/imagenet")) is None
    assert base_recipe(parse("--dataset", "folder", "--data-dir", "/data/x")) is None


def test_base_recipe_data_dir_with_builtin_dataset():
    assert base_recipe(parse("--dataset", "digits", "--data-dir", "/x")) == "digits"


def test_base_recipe_explicit_config_wins():
    assert base_recipe(parse("-c", "mine.yaml", "--dataset", "digits")) == "mine.yaml"
    assert base_recipe(parse("--config", "fashion_mnist")) == "fashion_mnist"


# ---- main ----------------------------------------------------------------------------------------------------
@pytest.fixture
def ray_forbidden(monkeypatch):
    """Fails the test if the command tries to connect to Ray (a session-wide Ray may already be up, so
    `ray.is_initialized()` alone would prove nothing)."""
    import raytrain_cls.commands.inference  # before the patch, which would otherwise stay in its `connect`
    import raytrain_cls.run.driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was contacted before the config error was reported")

    monkeypatch.setattr(raytrain_cls.run.driver, "connect", refuse)
    monkeypatch.setattr(raytrain_cls.commands.inference, "connect", refuse)


def test_invalid_value_is_a_usage_error_before_ray(capsys, ray_forbidden):
    """A bad value fails validation with exit code 2, the dotted key on stderr, and Ray never contacted."""
    code = main(["train", "--lr", "-1"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE == 2
    assert "optim.lr" in err and "-1" in err and "must be > 0" in err


def test_unknown_recipe_is_a_usage_error(capsys, ray_forbidden):
    assert main(["train", "-c", "digitz"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--config" in err and "did you mean 'digits'" in err


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochz", "3"])
    assert info.value.code == 2
    assert "--epochz" in capsys.readouterr().err


def test_wrong_flag_type_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "many"])
    assert info.value.code == 2


def test_no_command_prints_help(capsys):
    assert main([]) == EXIT_USAGE
    assert "train" in capsys.readouterr().out


def test_train_help_shows_defaults(capsys):
    """The help renders (no stray '%' in generated help) and shows timm's defaults."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--lr-base" in out and "(default: 0.1)" in out
    assert "--batch-size" in out and "-b" in out
    for name in recipe_names():
        assert name in out


def test_unparsable_key_value_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        parse("--model-kwargs", "a=[1")
    assert info.value.code == 2


def test_only_the_command_lines_own_process_freezes_its_objects_before_exiting(monkeypatch):
    """`raytrain-cls` (argv None) freezes every object as it returns, so that the interpreter's final collections
    skip torch's and timm's millions of objects (1.2-1.5 s off every command's exit here); a call from a process
    that lives on (these tests, a notebook) keeps its garbage collectable."""
    import gc
    import sys

    from raytrain_cls import entry

    monkeypatch.setattr(entry.cli, "main", lambda argv: 0)
    monkeypatch.setattr(sys, "argv", ["raytrain-cls", "list-models"])
    gc.unfreeze()
    try:
        assert entry.main(["list-models"]) == 0 and gc.get_freeze_count() == 0
        assert entry.main() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
