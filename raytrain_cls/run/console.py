"""The live console: a progress bar per epoch (loss, lr, img/s, ETA) drawn by the driver.

Why the driver: a Ray worker's stdout is never a terminal (Ray forwards it line by line, prefixed), so a bar
redrawn with carriage returns cannot come from rank 0 itself. Instead rank 0 pushes small events to a named
actor (fire-and-forget, no wait in the training step) and a driver thread drains it a few times a second and
draws. Without a terminal (CI, `ray job logs`, Tune trials) none of this exists: rank 0 prints plain lines.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional, TextIO

from raytrain_cls.core.progress import format_duration
from raytrain_cls.run.report import epoch_line, step_line

NAMESPACE = "raytrain_cls"
TICK_INTERVAL_S = 0.5  # how often rank 0 sends step positions (no host sync: counts and a clock only)
POLL_INTERVAL_S = 0.25
BAR_WIDTH = 24


# Lines that Ray forwards from its own processes to the driver and that say nothing a user can act on; each
# pattern names the line whole. Ray Train 2.60 starts its PreemptionWatcher actor with restarts on and the worker
# handles as arguments, for which Ray's core worker logs an error in every run (ray-project/ray#53727): should
# that actor's process die, its restart could fail and the group would miss preemption notices until its next
# start. Neither the user nor this project can change that; an "E" line in every run only teaches users to skip
# the lines that matter.
RAY_NOISE = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments "
        r"in the object store and max_restarts > 0\."
    ),
)
RAY_PRINT_HANDLER = "ray_print_logs"  # ray.init(log_to_driver=True) prints forwarded output through it


def drop_ray_noise() -> None:
    """Have the handler through which this driver prints its Ray processes' forwarded output drop RAY_NOISE lines
    (once per process; the rest is printed as Ray prints it). Ray's dispatcher is not a public API: a unit test
    (tests/unit/test_console.py) fails when it moves or the handler is renamed, and the e2e runs check the line
    is gone."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == RAY_PRINT_HANDLER]
    if len(printers) != 1 or getattr(printers[0], "drops_ray_noise", False):
        return  # log_to_driver off (nothing printed), or done already

    def print_without_noise(data: dict, printer=printers[0]) -> None:
        lines = [line for line in data.get("lines", ()) if not any(p.search(line) for p in RAY_NOISE)]
        if lines:
            printer({**data, "lines": lines})

    print_without_noise.drops_ray_noise = True
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, print_without_noise)


def use_bar(mode: str, stream: Optional[TextIO]) -> bool:
    if mode == "bar":
        return stream is not None
    if mode == "lines" or stream is None:
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class BoardState:
    """The board's body, plain Python (the actor wraps it): an append-only event list drained by the driver."""

    MAX_EVENTS = 10_000  # a driver that stopped draining must not grow the actor without bound

    def __init__(self):
        self.events: list = []

    def push(self, kind: str, payload) -> None:
        if len(self.events) < self.MAX_EVENTS or kind != "tick":
            self.events.append((kind, payload))

    def drain(self) -> list:
        out, self.events = self.events, []
        return out


def create_board():
    """A named, CPU-free actor the workers find by name; returns (handle, name)."""
    import ray

    name = f"progress-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=0)(BoardState).options(name=name, namespace=NAMESPACE).remote()
    ray.get(actor.drain.remote())  # started before any worker looks for it
    return actor, name


class WorkerConsole:
    """Rank 0's side: events to the board actor the driver drains (``board_name``) or straight to a renderer in
    this process (``draw``: a local run draws its own bar); without either, the same information as plain lines."""

    def __init__(self, board_name: Optional[str], num_epochs: int, draw: Optional[Callable[[str, Any], None]] = None):
        self.num_epochs = num_epochs
        self.push = draw
        self._last_tick = 0.0
        if board_name and draw is None:
            import ray

            try:
                board = ray.get_actor(board_name, namespace=NAMESPACE)
            except ValueError:  # the driver that drew the bar is gone (e.g. a restarted job): plain lines
                return
            self.push = lambda kind, payload: board.push.remote(kind, payload)  # fire and forget

    def say(self, text: str) -> None:
        if self.push is not None:
            self.push("text", text)
        else:
            print(text, flush=True)

    def step(self, m: dict) -> None:
        if self.push is not None:
            self.push("log", m)
        else:
            print(step_line(m, self.num_epochs), flush=True)

    def epoch(self, m: dict) -> None:
        if self.push is not None:
            self.push("epoch", m)
        else:
            print(epoch_line(m, self.num_epochs), flush=True)

    def tick(self, epoch: int, step: int, steps: int, elapsed: float, done_before: int) -> None:
        """Called every step; sends at most every TICK_INTERVAL_S, and only when there is a bar to draw."""
        if self.push is None:
            return
        now = time.monotonic()
        if now - self._last_tick >= TICK_INTERVAL_S or step == steps:
            self._last_tick = now
            self.push("tick", dict(epoch=epoch, step=step, steps=steps, elapsed=elapsed, done_before=done_before))


class BarRenderer:
    """Draws events on a terminal stream: one redrawn bar line for the current epoch, permanent lines for text
    and finished epochs (the bar is cleared first so they never interleave)."""

    def __init__(self, stream: TextIO, num_epochs: int):
        self.stream, self.num_epochs = stream, num_epochs
        self.last_log: dict = {}
        self.bar_shown = False

    def handle(self, kind: str, payload) -> None:
        if kind == "text":
            self._permanent(str(payload))
        elif kind == "epoch":
            self._permanent(epoch_line(payload, self.num_epochs))
            self.last_log = {}
        elif kind == "log":
            self.last_log = payload
            self._bar(payload["epoch"], payload["step"], payload["steps"], payload["elapsed"], 0)
        elif kind == "tick":
            self._bar(
                payload["epoch"], payload["step"], payload["steps"], payload["elapsed"], payload.get("done_before", 0)
            )

    def bar_line(self, epoch: int, step: int, steps: int, elapsed: float, done_before: int) -> str:
        frac = step / max(steps, 1)
        filled = int(BAR_WIDTH * frac)
        done_now = max(step - done_before, 0)
        rate = done_now / elapsed if elapsed > 0 else 0.0  # batches per second in this epoch
        eta = format_duration((steps - step) / rate) if rate > 0 else "?"
        text = f"Epoch {epoch}/{self.num_epochs - 1} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step}/{steps}"
        m = self.last_log
        if m.get("epoch") == epoch:
            text += f"  loss {m['loss']:.4f}  lr {m['lr']:.3e}  {m['img_per_sec']:.0f} img/s"
        return text + f"  ETA {eta}"

    def _bar(self, *position) -> None:
        self.stream.write("\r" + self.bar_line(*position) + "\x1b[K")
        self.stream.flush()
        self.bar_shown = True

    def _permanent(self, text: str) -> None:
        prefix = "\r\x1b[K" if self.bar_shown else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()
        self.bar_shown = False

    def close(self) -> None:
        if self.bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self.bar_shown = False


class LiveDisplay:
    """The driver thread: drain the board, render, until stopped (then one last drain)."""

    def __init__(self, drain: Callable[[], list], renderer: BarRenderer):
        self.drain, self.renderer = drain, renderer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytrain-cls-progress", daemon=True)

    def start(self) -> LiveDisplay:
        self._thread.start()
        return self

    def _pump(self) -> None:
        try:
            events = self.drain()
        except Exception:  # the display must never take the run down; the workers keep their own logs
            return
        for kind, payload in events:
            self.renderer.handle(kind, payload)

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._pump()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pump()
        self.renderer.close()


def start_live_display(num_epochs: int, stream: TextIO = sys.stdout):
    """(board name for the workers, a stop function) for a run drawn as a live bar on ``stream``."""
    import ray

    actor, name = create_board()
    display = LiveDisplay(lambda: ray.get(actor.drain.remote(), timeout=10), BarRenderer(stream, num_epochs))
    display.start()

    def stop() -> None:
        display.stop()
        ray.kill(actor)

    return name, stop
