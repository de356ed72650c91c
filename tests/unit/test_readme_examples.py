"""Every `raytrain-cls ...` example in the READMEs and the user guide (docs/) parses with the real CLI, and every
train/tune example's config validates (the flags exist, the values are allowed). The examples that can run on this
machine run elsewhere as written: the two commands (CI), the cluster block (tests/e2e/test_readme_cluster.py), the
default job, eval, predict, prepare, plot and doctor (tests/integration). This test catches the drift those cannot:
a renamed flag, a removed choice, an example for a GPU cluster that no longer validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from raytrain_cls.commands.cli import base_recipe, build_parser, overrides_of
from raytrain_cls.core.config import load_config
from raytrain_cls.core.model import check_model_name

ROOT = Path(__file__).resolve().parents[2]
DOCS = (
    "README.md",
    "jobs/README.md",
    "docs/benchmarks.md",
    "docs/training.md",
    "docs/data.md",
    "docs/tune.md",
    "docs/clusters.md",
    "docs/tools.md",
)


def examples() -> list[tuple[str, list[str]]]:
    """(where, argv after the program name) for each raytrain-cls command line in a bash block."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                for part in re.split(r"&&|;", line.split(" #")[0]):
                    words = shlex.split(part)
                    while words and re.match(r"^[A-Z_]+=", words[0]):  # RAY_ADDRESS=... raytrain-cls ...
                        words.pop(0)
                    if words[:1] == ["raytrain-cls"]:
                        found.append((f"{doc}: {part.strip()}", words[1:]))
                    elif words[:3] in (["python", "-m", "raytrain_cls"], ["python3", "-m", "raytrain_cls"]):
                        found.append((f"{doc}: {part.strip()}", words[3:]))
                    elif words[:2] == ["--", "raytrain-cls"]:
                        found.append((f"{doc}: {part.strip()}", words[2:]))
                    elif "--" in words and words[words.index("--") + 1 :][:1] == ["raytrain-cls"]:
                        found.append((f"{doc}: {part.strip()}", words[words.index("--") + 2 :]))
    return found


EXAMPLES = examples()


def test_the_readmes_have_examples():
    commands = {argv[0] for _, argv in EXAMPLES if argv}
    assert {"train", "tune", "eval", "predict", "prepare", "plot", "doctor", "bench"} <= commands, commands


@pytest.mark.parametrize("where,argv", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_parses_and_its_config_validates(where, argv, capsys):
    if not argv or "--help" in argv:
        return
    if argv[0] == "bench":
        from raytrain_cls.bench.cli import parse_args

        parse_args(argv[1:])
        return
    args = build_parser().parse_args(argv)  # SystemExit (argparse's error) fails the test with the message
    if args.command != "train":
        return  # tune: a search config is checked against its training config by test_tune_spec / cmd_tune
    if args.config and not (ROOT / args.config).exists():
        return  # `-c my_run.yaml`: the user's own file
    if getattr(args, "resume", None) and "<" in str(args.resume):
        return  # `--resume <run dir>`: its config is that run's own config.yaml
    cfg = load_config(base_recipe(args), overrides_of(args)).validate()
    check_model_name(cfg.model.model)  # checked on the driver at resolve time, not by validate()
