"""raytrain_cls.core.progress: one redrawn line on a terminal, a plain line per ~10% otherwise; clock, stream given."""

from __future__ import annotations

import io

import pytest

from raytrain_cls.core.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_writes_one_line_per_tenth_and_none_extra_at_close():
    out, clock = io.StringIO(), FakeClock()
    with Progress(100, "encode", stream=out, clock=clock, tty=False) as p:
        for _ in range(100):
            clock.now += 0.5
            p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("encode: 10/100 ( 10.0%)")
    assert lines[-1].startswith("encode: 100/100 (100.0%)")
    assert "\r" not in out.getvalue()


def test_log_stopped_early_writes_where_it_ended():
    out = io.StringIO()
    p = Progress(100, "check", stream=out, clock=FakeClock(), tty=False)
    p.update(35)  # jumps three tenths at once: one line, not three
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["check: 35/100", "check: 35/100"]


def test_log_large_totals_stay_short():
    out = io.StringIO()
    with Progress(70_000, "x", stream=out, clock=FakeClock(), tty=False) as p:
        for _ in range(70_000):
            p.update()
    assert len(out.getvalue().splitlines()) == 10


def test_tty_redraws_one_line_at_most_ten_times_a_second():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(100, "encode", stream=out, clock=clock, tty=True)
    clock.now = 1.0
    p.update(10)
    assert out.getvalue() == "\rencode: 10/100 ( 10.0%) 10.0/s ETA 0:09\x1b[K"
    clock.now = 1.05
    p.update(10)  # within 0.1 s of the last redraw: nothing written
    assert out.getvalue().count("\r") == 1
    clock.now = 1.2
    p.update(10)
    assert out.getvalue().count("\r") == 2 and "30/100" in out.getvalue()
    clock.now = 2.0
    p.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, redrawn in place
    assert text.rsplit("\r", 1)[1].startswith("encode: 30/100 ( 30.0%) 15.0/s ETA 0:05")


def test_tty_finished_line_shows_elapsed_time():
    out, clock = io.StringIO(), FakeClock()
    with Progress(4, "w", stream=out, clock=clock, tty=True) as p:
        clock.now = 125.0
        p.update(4)
    assert out.getvalue().rsplit("\r", 1)[1] == "w: 4/4 (100.0%) 0.0/s in 2:05\x1b[K\n"


def test_zero_total_still_reports_once():
    out = io.StringIO()
    with Progress(0, "empty", stream=out, clock=FakeClock(), tty=False):
        pass
    assert out.getvalue() == "empty: 0/0 0.0/s in 0:00\n"


def test_tty_is_detected_from_the_stream():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert Progress(1, stream=Terminal()).tty is True
    assert Progress(1, stream=io.StringIO()).tty is False


def test_default_stream_is_stderr_at_construction_time(capsys):
    with Progress(2, "late", clock=FakeClock()) as p:
        p.update(2)
    assert "late: 2/2" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.6, "1:00"), (61, "1:01"), (3600 + 62, "1:01:02")])
def test_format_duration(seconds, text):
    shown = format_duration(seconds)  # a formatter of given numbers, not a timing
    assert shown == text
