"""A small progress display for long work (no tqdm).

On a terminal it redraws one line in place (count/total, percent, rate, ETA) at most ten times a second; into a
log file or pipe it writes a plain line about every 10% and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Optional, TextIO

REDRAW_INTERVAL_S = 0.1  # terminal: redrawing more often only costs time
LOG_STEPS = 10  # not a terminal: one line per tenth of the work


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """``with Progress(total, "encode") as p: ... p.update()``. ``stream`` defaults to the sys.stderr of the moment
    (so redirections made after import are honoured); ``clock`` and ``tty`` can be injected for tests."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        stream: Optional[TextIO] = None,
        clock: Callable[[], float] = time.monotonic,
        tty: Optional[bool] = None,
    ):
        self.total, self.desc, self.count = max(0, int(total)), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock, self.start = clock, clock()
        self._last_draw = float("-inf")
        self._last_step = 0  # the last tenth written (not a terminal)
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.count / elapsed
        text = f"{self.desc}: {self.count:,}/{self.total:,}"
        if self.total:
            text += f" ({100.0 * self.count / self.total:5.1f}%)"
        text += f" {rate:,.1f}/s"
        if self.count < self.total:
            text += f" ETA {format_duration((self.total - self.count) / rate)}" if rate > 0 else " ETA ?"
        else:
            text += f" in {format_duration(elapsed)}"
        return text

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.tty:
            now = self.clock()
            if now - self._last_draw >= REDRAW_INTERVAL_S:
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\x1b[K")  # \x1b[K clears what a longer line left
                self.stream.flush()
        elif self.total:
            step = min(LOG_STEPS, self.count * LOG_STEPS // self.total)
            if step > self._last_step:
                self._last_step = step
                self._write_line()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()
        elif self._last_step < LOG_STEPS or not self.total:  # the end, unless its line is already out
            self._write_line()

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
