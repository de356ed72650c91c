"""`raytrain-cls` and `python -m raytrain_cls`: the one entry point above every layer.

Every sub-command goes to the commands' parser except `bench`: the benchmarks sit above the commands (they drive the
same `train` parser a user does) and have a parser of their own, so the commands never import them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from raytrain_cls.commands import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["bench"]:
        # Imported only when asked: the benchmarks pull in most of the project and torchvision's decoders.
        from raytrain_cls.bench.cli import main as bench_main

        return bench_main((sys.argv[1:] if argv is None else list(argv))[1:])
    return cli.main(argv)  # None stays None: cli tells a real command line from a call in a longer-lived process
