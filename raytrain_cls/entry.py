"""`raytrain-cls` and `python -m raytrain_cls`: the one entry point above every layer.

Every sub-command goes to the commands' parser except `bench`: the benchmarks sit above the commands (they drive the
same `train` parser a user does) and have a parser of their own, so the commands never import them. Both end a
user's mistake the same way (commands.cli.finish_errors: one line, never a traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from raytrain_cls.commands import cli
from raytrain_cls.core.gcpause import freeze_before_exit


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["bench"]:
            # Imported only when asked: the benchmarks pull in most of the project and torchvision's decoders.
            from raytrain_cls.bench.cli import main as bench_main

            return cli.finish_errors(lambda: bench_main(args[1:]))
        return cli.main(argv)  # None stays None: cli tells a real command line from a call in a longer-lived process
    finally:
        if argv is None:  # the command line's process, which exits next
            freeze_before_exit()  # core/gcpause.py
