"""Python's cyclic garbage collector held off while a process imports torch and timm.

Importing them creates some 400,000 objects, and the collector, which runs by allocation count, walks the growing
heap again and again on the way: six full collections, 0.57 s of a 4.3-s `import torch, timm` on the 2-core
machine (2026-12-06, docs/benchmarks.md). Held off, the imports make the same objects without those walks. In a
process that is ours alone (the command line's, a Ray Train worker's) what the imports made is then frozen into the
permanent generation (`gc.freeze`): module-level objects that live as long as the process and that no later
collection needs to walk. A process that lives on after us (a notebook, the test suite) only gets its collector
back: freezing there would keep whatever garbage it had at that moment for good. The command line's process
also freezes everything as it returns (``freeze_before_exit``), which spares the interpreter's teardown the same
walks.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_held(freeze: bool) -> Iterator[None]:
    """The collector off for the block, then on again; ``freeze``: what exists then goes to the permanent
    generation first. A collector that someone else turned off stays as they left it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()


def hold_collector() -> None:
    """A Ray Train worker process's set-up hook (``worker_process_setup_hook``): the collector off from the process
    start, through Ray Train's torch and our train function's timm, until ``release_collector``."""
    gc.disable()


def release_collector() -> None:
    """The train function's first step in a Ray Train worker: freeze what the imports made, collector on again.
    Nothing where the collector was never held (a local run's or a trial's loop runs in a process that lives on)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def freeze_before_exit() -> None:
    """The command line's process, just before it exits: every object alive now out of the collector's reach.

    With torch and timm loaded, the interpreter's teardown spent 1.2-1.3 s of every command's exit in its final
    garbage collections, walking their millions of objects (2-core machine, 2026-12-06; docs/benchmarks.md); frozen,
    the teardown takes 0.2 s. What still has to run does: Ray's atexit shutdown, and every object's release by
    reference count. Only reference cycles that are still alive at exit lose their finalizers, which Python never
    promised to run at exit anyway."""
    gc.freeze()
