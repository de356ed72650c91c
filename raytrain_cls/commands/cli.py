"""raytrain-cls command line. The flags are generated from the config fields, so they keep timm's names and
defaults and can never drift from what the YAML accepts.

Precedence, lowest first: timm's defaults -> the config file or bundled recipe (-c) -> flags on the command line.

Each sub-command imports what it runs (torch, timm, Ray, the run side) inside its cmd_* function: `--help`, a usage
error, `prepare` and `doctor` then answer without paying for the training stack's imports (several seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import yaml

from raytrain_cls.core.config import (
    DEFAULT_MAX_IMAGE_PIXELS,
    GROUPS,
    Config,
    ConfigError,
    iter_fields,
    load_config,
    parse_worker_count,
    read_yaml,
    recipe_names,
    resolve_config_path,
)
from raytrain_cls.core.datasets import PREPARABLE, canonical_dataset
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.gcpause import collector_held
from raytrain_cls.core.storage import atomic_write_text, exists, join, unwritable_reason

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by SIGINT

GROUP_TITLES = {
    "data": "data (timm's dataset flags; -j/--workers = loader processes per training worker)",
    "scaling": "Ray scaling (Ray's names: --num-workers = Ray training workers, one process per GPU)",
}


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value)  # "4" -> 4, "true" -> True, "a" -> "a"
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: cannot read value {value!r}") from None


class _KeyValues(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def _parsed_by(parse: Callable):
    """An argparse type from a config field's own parser: its ConfigError becomes argparse's usage error."""

    def parsed(text: str):
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.reason) from None

    return parsed


def _scalar_type(hint):
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per config field: --kebab-case of the field name (plus timm's short forms)."""
    groups = {name: parser.add_argument_group(GROUP_TITLES.get(name, name)) for name in GROUPS}
    for group, name, f, hint in iter_fields():
        if name in exclude:
            continue
        meta = f.metadata
        flags = [f"--{name.replace('_', '-')}", *meta.get("flags", ())]
        shown = f.default_factory() if callable(f.default_factory) else f.default
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" {{{', '.join(map(str, meta['choices']))}}}"
        if "(default:" not in help_text:  # some helps say what an unset (None) default means instead
            help_text += f" (default: {shown!r})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        base = _scalar_type(hint)
        origin = typing.get_origin(base)
        if meta.get("parse"):
            kwargs.update(type=_parsed_by(meta["parse"]), metavar=name.upper())
        elif base is bool and name.startswith("no_"):
            kwargs["action"] = "store_true"  # --no-aug, not --no-aug / --no-no-aug
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(nargs=meta.get("nargs") or "+", type=typing.get_args(base)[0], metavar=name.upper())
        elif base is dict or origin is dict:
            kwargs.update(nargs="*", type=_key_value, action=_KeyValues, metavar="KEY=VALUE")
        else:
            kwargs.update(type=base, metavar=name.upper())
        groups[group].add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrain-cls", description="timm image-classifier training on Ray Train.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a model (no arguments: the bundled digits job on local Ray)",
        description="Train a timm model with Ray Train. Without -c, --dataset digits and "
        "fashion_mnist start from their bundled recipe; an ImageFolder "
        "(--data-dir) starts from timm's defaults.",
    )
    train.add_argument(
        "-c",
        "--config",
        metavar="FILE|RECIPE",
        help=f"YAML config file, or a bundled recipe: {', '.join(recipe_names())}",
    )
    add_config_flags(train)
    tune = sub.add_parser(
        "tune",
        help="Ray Tune search over any config key, each trial a Ray Train run",
        description="Search with Ray Tune. -c takes a training config with a `search:` block; "
        "--search KEY=KIND:ARGS adds dimensions (uniform, loguniform, quniform, "
        "qloguniform, randint, qrandint: numbers separated by ':'; choice, grid: "
        "values separated by ','). Default space: lr, mixup, smoothing.",
    )
    tune.add_argument("-c", "--config", metavar="FILE|RECIPE", help="search YAML, or a training config/recipe")
    tune.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search")
    tune.add_argument("--search", action="append", metavar="KEY=KIND:ARGS", help="a search dimension (repeatable)")
    opts = tune.add_argument_group("search")
    for flag, kind, text in SEARCH_FLAGS:
        dest = f"search__{flag.replace('-', '_')}"
        if kind is bool:
            opts.add_argument(f"--{flag}", dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        opts.add_argument(
            f"--{flag}",
            dest=dest,
            type=kind,
            default=argparse.SUPPRESS,
            metavar="N" if kind is not str else "NAME",
            help=text,
        )
    add_config_flags(tune, exclude=("resume", "no_resume_opt", "initial_checkpoint"))
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint or exported model: loss, top-1/5, per class",
        description="timm validate.py for raytrain-cls checkpoints (in-process, one device). "
        "By default on the validation split of the data set the model was trained on.",
    )
    ev.add_argument(
        "checkpoint", help="a checkpoint directory or an exported model directory (a path or an s3:// / gs:// URI)"
    )
    ev.add_argument("--dataset", help="evaluate on this data set instead (digits, fashion_mnist, folder, parquet)")
    ev.add_argument("--data-dir", help="data set root (ImageFolder tree, Parquet shards (path or URI), IDX files)")
    ev.add_argument("--val-split", help="validation split folder name")
    ev.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    ev.add_argument("--tta", type=_count, default=0, help="test-time augmentation: > 0 averages with flipped images")
    ev.add_argument("--crop-pct", type=_fraction, help="center-crop fraction (default: the model's)")
    ev.add_argument("-b", "--batch-size", type=_positive_int, default=256)
    ev.add_argument("-j", "--workers", type=_count, default=2, help="data-loading processes")
    ev.add_argument(
        "--ray-workers",
        type=_count,
        default=0,
        help="split the validation set across N Ray tasks (RAY_ADDRESS's cluster, else a local Ray; "
        "on GPUs when it has them); 0 = in this process",
    )
    ev.add_argument("--results-file", help="write the results as .json or .csv (per class)")
    pr = sub.add_parser("predict", help="top-k classes for images, folders of images or Parquet shards")
    pr.add_argument(
        "checkpoint", help="a checkpoint directory or an exported model directory (a path or an s3:// / gs:// URI)"
    )
    pr.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders (searched recursively), prepared Parquet shard folders or URIs (every row)",
    )
    pr.add_argument("--topk", type=_positive_int, default=5)
    pr.add_argument("-b", "--batch-size", type=_positive_int, default=64)
    pr.add_argument("--use-ema", action="store_true", help="use the EMA weights")
    pr.add_argument("--format", choices=("csv", "json"), default="csv")
    pr.add_argument("--out", help="write here instead of standard output")
    pl = sub.add_parser("plot", help="PNG plots of a run (loss, accuracy, lr) or of a search (trial curves)")
    pl.add_argument("directory", help="a run directory or a search directory")
    dr = sub.add_parser("doctor", help="check versions, GPUs, the Ray cluster and token, storage and data")
    dr.add_argument("-c", "--config", metavar="FILE|RECIPE", help="check the data and output of this config")
    dr.add_argument("--dataset")
    dr.add_argument("--data-dir")
    dr.add_argument("--output", help="storage path or URI to check (default ./output/train)")
    export = sub.add_parser("export", help="write a checkpoint's model as safetensors + config.json (timm rebuilds it)")
    export.add_argument("checkpoint", help="a checkpoint directory (e.g. <run>/epoch-0009; a path or a URI)")
    export.add_argument("out_dir", help="where to write model.safetensors, ema.safetensors, config.json")
    add_prepare_parser(sub)
    sub.add_parser(
        "bench",
        help="benchmarks: step | tta | loader | train | gpu-checks | make-data (prints JSON lines; "
        "`raytrain-cls bench --help`)",
    )
    return parser


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = f"int >= {lowest}"  # argparse names the type in its messages
    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def add_prepare_parser(sub) -> None:

    pp = sub.add_parser(
        "prepare",
        help="convert an ImageFolder tree, digits or fashion_mnist into Parquet shards",
        description="Write SRC as Parquet shards + manifest.json in the local folder DST (replaced "
        "only once the new one is complete). Train from it with --dataset parquet "
        "--data-dir DST, or copy DST to object storage (aws s3 sync DST s3://...) and "
        "pass --data-dir s3://...",
    )
    pp.add_argument("src", metavar="SRC", help="an ImageFolder tree, or 'digits' or 'fashion_mnist'")
    pp.add_argument("dst", metavar="DST", help="the local output folder")
    pp.add_argument(
        "--dataset",
        type=canonical_dataset,
        choices=PREPARABLE,
        help="what SRC is (default: digits/fashion_mnist by name, else folder); with fashion_mnist, "
        "SRC may be a folder holding the *-ubyte.gz files",
    )
    pp.add_argument(
        "--shard-size", type=_positive_int, default=1024, metavar="N", help="images per shard (default 1024)"
    )
    pp.add_argument("--class-map", metavar="FILE", help="class names in index order (.txt, YAML or JSON)")
    pp.add_argument(
        "-j",
        "--workers",
        type=_count,
        metavar="N",
        help="processes that check/encode images (default: one per CPU; 0 or 1: in this process)",
    )
    pp.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"larger images are skipped as possible decompression bombs (default {DEFAULT_MAX_IMAGE_PIXELS:,})",
    )
    pp.add_argument("--train-split", default="train", help="training split folder (default train)")
    pp.add_argument("--val-split", default="validation", help="validation split folder (default validation)")


SEARCH_FLAGS = (
    ("num-samples", int, "trials to sample (default 8; with grid dimensions: repeats of the grid)"),
    ("metric", str, "metric to optimise (default eval_<--eval-metric>)"),
    ("mode", str, "min or max (default: min for a loss, else max)"),
    ("scheduler", str, "asha (default: stops bad trials early) or fifo"),
    ("grace-period", int, "ASHA: epochs every trial runs before it can be stopped (default 1)"),
    ("reduction-factor", float, "ASHA: keep 1/N of the trials at each rung (default 2)"),
    ("searcher", str, "random (default) or optuna (pip install 'raytrain-cls[optuna]')"),
    ("max-concurrent-trials", int, "trials running at once (default: as many as the cluster fits)"),
    ("workers-per-trial", _parsed_by(parse_worker_count), "Ray Train workers per trial, N or MIN:MAX (default 1)"),
    ("cpus-per-worker", float, "CPUs per trial worker (default 1)"),
    ("gpus-per-worker", float, "GPUs per trial worker; fractions such as 0.25 share a GPU (default 0)"),
    (
        "in-process",
        bool,
        "one-worker trials train in Tune's trial process, which the next trial reuses: no Ray Train run per trial, "
        "seconds less fixed cost each (local or mounted --output only)",
    ),
)


def base_recipe(args: argparse.Namespace) -> Optional[str]:
    """The config to start from: -c; else, continuing a run, that run's config.yaml; else the bundled recipe of a
    built-in data set (digits by default)."""
    if args.config:
        return args.config
    if getattr(args, "resume", None):
        from raytrain_cls.run.checkpointer import find_resume_target, resolve_output, run_config_file

        kind, target = find_resume_target(args.resume, resolve_output(getattr(args, "output", "")))
        if kind == "run" and run_config_file(target):
            return run_config_file(target)
    return default_recipe(getattr(args, "dataset", None), getattr(args, "data_dir", None))


def default_recipe(dataset: Optional[str], data_dir: Optional[str]) -> Optional[str]:
    """The bundled recipe of a built-in data set (digits when nothing is named); None for an ImageFolder tree
    (--data-dir without --dataset), which starts from timm's defaults."""
    if data_dir and dataset is None:
        return None
    name = canonical_dataset(dataset or "digits")
    return name if name in recipe_names() else None


def overrides_of(args: argparse.Namespace) -> dict:
    return {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "search")
        and not k.startswith("search__")
        and not (args.command == "tune" and k == "resume")
    }


def cmd_train(args: argparse.Namespace, process_is_command: bool = False) -> int:
    with collector_held(freeze=process_is_command):  # torch and timm: core/gcpause.py
        from raytrain_cls.run.driver import RunInterrupted, TrainingError, train
        from raytrain_cls.run.preflight import preflight  # noqa: F401  train()'s checks before Ray: torch, timm
        from raytrain_cls.run.startup import process_start

    # After the driver's imports (torch, timm); from the process start only when this process is the command.
    stamps = {"driver": time.time()}
    if process_is_command:
        stamps["process"] = process_start(command=True)

    cfg = load_config(base_recipe(args), overrides_of(args))
    try:
        train(cfg, console=sys.stdout, stamps=stamps)
    except TrainingError as e:
        return _failed(e, EXIT_FAILED)
    except RunInterrupted as e:
        return _failed(e, EXIT_INTERRUPTED)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    with collector_held(freeze=False):  # torch and timm: core/gcpause.py
        from raytrain_cls.run.tune import (
            SEARCH_FILE,
            SearchInterrupted,
            load_search_file,
            parse_search,
            space_from_cli,
            tune_search,
        )

    if args.resume:
        if not exists(join(args.resume, SEARCH_FILE)):
            raise ConfigError("--resume", args.resume, f"not a search directory (no {SEARCH_FILE})")
        raw, search = load_search_file(join(args.resume, SEARCH_FILE))
    elif args.config:
        raw, search = load_search_file(str(resolve_config_path(args.config)))
    else:
        recipe = base_recipe(args)
        raw, search = (read_yaml(resolve_config_path(recipe)) if recipe else {}), {}
    base = Config().update(raw)
    if not args.resume:
        base.update(overrides_of(args))
    cli = {k[len("search__") :]: v for k, v in vars(args).items() if k.startswith("search__")}
    spec = parse_search(search, space_from_cli(args.search), cli)
    try:
        tune_search(base, spec, resume=args.resume)
    except SearchInterrupted as e:
        return _failed(e, EXIT_INTERRUPTED)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from raytrain_cls.commands.inference import evaluate_checkpoint, write_eval_results

    overrides = {
        k: v
        for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir), ("val_split", args.val_split))
        if v is not None
    }
    if args.results_file:  # before the evaluation: its result is never lost to a folder that cannot be written
        _check_writable("--results-file", args.results_file)
    res = evaluate_checkpoint(
        args.checkpoint,
        overrides,
        use_ema=args.use_ema,
        tta=args.tta,
        crop_pct=args.crop_pct,
        batch_size=args.batch_size,
        workers=args.workers,
        ray_workers=args.ray_workers,
    )
    print(
        f"{res['samples']} images: loss {res['loss']:.4f}  top1 {res['top1']:.2f}  top5 {res['top5']:.2f}"
        f"{'  (EMA)' if res['use_ema'] else ''}{'  (TTA)' if res['tta'] else ''}"
    )
    worst = sorted(res["per_class"].items(), key=lambda kv: kv[1]["top1"])[:5]
    print("lowest per-class top-1: " + ", ".join(f"{k} {v['top1']:.1f}" for k, v in worst))
    if res["skipped"]:
        print(
            f"raytrain-cls: skipped {res['skipped']} unreadable image(s), e.g. "
            + "; ".join(res["skipped_examples"][:3]),
            file=sys.stderr,
        )
    if args.results_file:
        write_eval_results(res, args.results_file)
        print(f"Results: {args.results_file}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from raytrain_cls.commands.inference import format_predictions, predict

    if args.out:
        _check_writable("--out", args.out)
    rows = predict(args.checkpoint, args.inputs, topk=args.topk, batch_size=args.batch_size, use_ema=args.use_ema)
    text = format_predictions(rows, args.format)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"{len(rows)} predictions: {args.out}")
    else:
        sys.stdout.write(text)
    failed = sum(1 for r in rows if "error" in r)
    if failed:
        print(f"raytrain-cls: {failed} image(s) could not be read (see the error column)", file=sys.stderr)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from raytrain_cls.run.plots import plot_run, plot_search

    d = args.directory
    try:
        written = [plot_search(d)] if exists(join(d, "trials.csv")) else plot_run(d)
    except FileNotFoundError as e:
        return _failed(e, EXIT_USAGE)
    for path in written:
        print(path)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from raytrain_cls.commands.doctor import run_doctor

    overrides = {
        k: v
        for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir), ("output", args.output))
        if v is not None
    }
    recipe = args.config or default_recipe(args.dataset, args.data_dir)
    cfg = load_config(recipe, overrides) if recipe else Config().update(overrides)
    checks = run_doctor(cfg)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok and not c.warn]
    print(f"{len(failed)} problem(s) found" if failed else "everything needed for a run is in place")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from raytrain_cls.commands.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out_dir)
    print(
        f"Exported {info['architecture']} ({info['num_classes']} classes, epoch {info['epoch']}): "
        f"{', '.join(info['weights'])} and config.json in {args.out_dir}"
    )
    return EXIT_OK


def cmd_prepare(args: argparse.Namespace) -> int:
    from raytrain_cls.data.prepare import prepare

    reason = unwritable_reason(args.dst)
    if reason and not Path(args.dst).is_file():  # DST itself a file: prepare's own message says so
        raise ConfigError("DST", args.dst, f"cannot be written: {reason}")
    prepare(
        args.src,
        args.dst,
        dataset=args.dataset,
        shard_size=args.shard_size,
        class_map=args.class_map,
        train_split=args.train_split,
        val_split=args.val_split,
        max_image_pixels=args.max_image_pixels,
        workers=args.workers,
    )
    return EXIT_OK


COMMANDS = {
    "train": cmd_train,
    "tune": cmd_tune,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "plot": cmd_plot,
    "doctor": cmd_doctor,
    "export": cmd_export,
    "prepare": cmd_prepare,
}
TRACEBACK_ENV = "RAYTRAIN_CLS_TRACEBACK"  # set to 1: an unexpected error shows its traceback


def _check_writable(flag: str, file: str) -> None:
    reason = unwritable_reason(os.path.dirname(os.path.abspath(file)))
    if reason or os.path.isdir(file):
        raise ConfigError(flag, file, f"cannot be written: {reason or 'it is a folder'}")


def _one_line(error: BaseException) -> str:
    """An error's message without the traceback text some carry inside it (a DataLoader worker's error is re-raised
    with the worker's traceback in its message): its last line then."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].strip()
    return text or type(error).__name__


def _failed(error: BaseException, code: int) -> int:
    print(f"raytrain-cls: {_one_line(error)}", file=sys.stderr)
    return code


def run_command(args: argparse.Namespace, process_is_command: bool = False) -> int:
    """Run one sub-command, its errors ended by finish_errors."""
    if args.command == "train":
        return finish_errors(lambda: cmd_train(args, process_is_command=process_is_command))
    return finish_errors(lambda: COMMANDS[args.command](args))


def finish_errors(command: Callable[[], int]) -> int:
    """Run a command. A user's mistake (UserError: config, data, checkpoint, shards) ends in its message and exit
    2; a failing disk or permission in exit 1 with the OS's words; Ctrl-C in 130. Anything else is a bug of this
    project: one line saying so, with the traceback only when RAYTRAIN_CLS_TRACEBACK=1 asks for it."""
    try:
        return command()
    except UserError as e:
        return _failed(e, EXIT_USAGE)
    except KeyboardInterrupt:
        return _failed(KeyboardInterrupt("interrupted"), EXIT_INTERRUPTED)
    except OSError as e:  # disk full, permission denied, a path that vanished: the OS's words and the file
        return _failed(e, EXIT_FAILED)
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        return _failed(
            RuntimeError(
                f"unexpected error {type(e).__name__}: {_one_line(e)}. This is a bug of raytrain-cls: please report "
                f"it with the traceback that {TRACEBACK_ENV}=1 prints"
            ),
            EXIT_FAILED,
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # listed in the help only: raytrain_cls.entry gives `bench` to its own parser
        raise SystemExit("raytrain-cls bench: run it as `raytrain-cls bench ...` (raytrain_cls.entry)")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in COMMANDS:
        parser.print_help()
        return EXIT_USAGE
    # from_command_line: train's start-up clock starts at the process start only when this process is the command
    return run_command(args, process_is_command=from_command_line)


if __name__ == "__main__":
    sys.exit(main())
