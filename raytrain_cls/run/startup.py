"""Where a run's start-up seconds go, from the command's process start to the first finished training step.

Every Ray Train ``fit()`` pays a fixed cost before its first step (ray.init, the Train controller, the worker
group, the workers' imports, data and model set-up), and a Tune search pays it again for every trial. To cut it
one has to see it, so the driver and rank 0 each stamp the wall clock at the phase boundaries below; rank 0
reports its stamps with every epoch's metrics (``startup``), and the driver turns both into a breakdown that it
prints after the run and writes into result.json.

Stamps are ``time.time()`` seconds: the driver and rank 0 may be on different nodes, whose clocks NTP keeps
within milliseconds of each other, far below the seconds measured here.
"""

from __future__ import annotations

import time
from typing import Optional

# (stamp, the phase that ends at it), in the order they happen. A phase is the time since the previous stamp
# that is present (a Tune trial's "process" is its actor process's first import of raytrain_cls: trial.run_trial).
PHASES = (
    ("process", None),
    ("driver", "python start + driver imports (torch, timm)"),
    ("checked", "pre-Ray checks (data set, model on the meta device, checkpoint)"),
    ("ray_ready", "import ray.train + ray.init / connect"),
    ("resolved", "config resolution on the cluster"),
    ("fit", "run directory + trainer set-up"),
    ("worker_process", "Ray Train controller + worker group"),
    # Ray Train imports torch and forms the process group before it hands a worker the train function, so the
    # import of the function's module (run/worker_entry.py: worker_imported) comes after both (checked: the group
    # is up there, timm is not); the loop's own modules are imported when the function is called.
    ("worker_imported", "worker start (Ray worker, torch, process group)"),
    ("worker_entered", "train function imports (timm, raytrain_cls)"),
    ("data_ready", "data set + loaders"),
    ("model_ready", "model, optimizer, checkpoint restore"),
    ("first_step", "first training step"),
)
# A Tune trial that trains in its own process (tune --in-process, run/trial_process.py) has no Ray Train run: its
# "in_process" stamp (the trial entering the process) marks its stamps, and its phases are these.
IN_PROCESS_PHASES = (
    ("process", None),  # the trial process's first import of raytrain_cls: its first trial only
    ("in_process", "trial process imports (torch, timm, raytrain_cls)"),
    ("ray_ready", "connect"),
    ("resolved", "config resolution (data set, model on the meta device)"),
    ("fit", "run directory"),
    ("data_ready", "data set + loaders"),
    ("model_ready", "model, optimizer, checkpoint restore"),
    ("first_step", "first training step"),
)
# A local-mode run (train --num-workers 0, driver.fit_here) trains in the command's own process: no Ray at all. Its
# "local" stamp (the loop about to start) marks its stamps; the worker's own process stamps are this process's.
LOCAL_PHASES = (
    ("process", None),
    ("driver", "python start + imports (torch, timm)"),
    ("checked", "checks (data set, model on the meta device, checkpoint)"),
    ("resolved", "config resolution on this machine"),
    ("local", "run directory"),
    ("data_ready", "data set + loaders"),
    ("model_ready", "model, optimizer, checkpoint restore"),
    ("first_step", "first training step"),
)
STAMPS = tuple(name for name, _ in PHASES)
KNOWN_STAMPS = tuple(dict.fromkeys(name for name, _ in PHASES + IN_PROCESS_PHASES + LOCAL_PHASES))


# A command's interpreter reaches its first import (raytrain_cls) in well under a second; the OS's figure for the
# process start is trusted only that far back from it.
MAX_INTERPRETER_START_S = 3.0


def process_start(command: bool = False) -> Optional[float]:
    """This process's start (wall clock), from the OS; None where it cannot tell.

    ``command``: this process is a raytrain-cls command, whose first import stamped raytrain_cls.IMPORTED_AT. The
    OS's figure is then checked against that stamp, and replaced by it when the two disagree: /proc's boot-time
    clock and the wall clock can part on virtual machines (a freshly booted one put the process start 100 s
    before the command was typed). The stamp misses only the interpreter's own start (tens of ms).
    A Ray worker process (``command`` False) is used as the OS tells: it may well have started long before."""
    import raytrain_cls

    started = _os_process_start()
    if not command:
        return started
    imported = raytrain_cls.IMPORTED_AT
    if started is None or not imported - MAX_INTERPRETER_START_S <= started <= imported:
        return imported
    return started


def _os_process_start() -> Optional[float]:
    """/proc on Linux (start ticks against the uptime, both boot-time clocks), else psutil."""
    try:
        import os

        with open("/proc/self/stat") as f:  # field 22: start time in clock ticks after boot
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:  # seconds since boot, to 10 ms (btime in /proc/stat is whole seconds)
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing stamp only merges two phases of the breakdown
        return None


def stamp(stamps: dict, name: str, at: Optional[float] = None) -> None:
    """Records ``name`` now unless it is already there (a restarted worker group keeps the first stamps), or at
    ``at`` whatever was there."""
    if name not in KNOWN_STAMPS:
        raise KeyError(f"unknown start-up stamp {name!r}: one of {KNOWN_STAMPS}")
    if at is not None or name not in stamps:
        stamps[name] = time.time() if at is None else at


def breakdown(stamps: dict) -> dict:
    """{"total_s": first stamp to the last, "until": the last stamp, "phases": [(label, seconds), ...]}.

    Stamps that are missing or out of order are left out and their phase merges into the next one ("A + B"): a
    Ray worker process may have been started before this run (Ray keeps idle workers), and then only the time
    from the fit to the worker's imports says something."""
    order = IN_PROCESS_PHASES if "in_process" in stamps else LOCAL_PHASES if "local" in stamps else PHASES
    phases, previous, pending = [], None, []
    for name, label in order:
        at = stamps.get(name)
        if at is None or (previous is not None and at < stamps[previous]):
            if label is not None and previous is not None:
                pending.append(label)
            continue
        if previous is not None:
            phases.append((" + ".join([*pending, label]), round(at - stamps[previous], 3)))
        previous, pending = name, []
    first = next((n for n, _ in order if stamps.get(n) is not None), None)
    total = round(stamps[previous] - stamps[first], 3) if phases else 0.0
    return dict(total_s=total, until=previous if phases else None, phases=phases)


def describe(result: dict) -> str:
    """One line for the console: 'Start-up 24.1 s to the first step: ray.init / connect 8.2 s, ...'."""
    if not result.get("phases"):
        return ""
    until = "the first step" if result["until"] == "first_step" else result["until"]
    parts = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in result["phases"])
    return f"Start-up {result['total_s']:.1f} s to {until}: {parts}"
