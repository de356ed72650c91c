"""raytrain_cls.run.console: when a bar is drawn, what it shows (position, loss, lr, img/s, ETA), and that permanent
lines (epochs, messages) never interleave with it. The actor and the thread are exercised without Ray."""

from __future__ import annotations

import io
import threading

from raytrain_cls.run.console import BarRenderer, BoardState, LiveDisplay, WorkerConsole, use_bar

EPOCH = dict(
    epoch=0,
    train_loss=1.5,
    eval_loss=1.2,
    eval_top1=55.0,
    eval_top5=90.0,
    lr=0.1,
    img_per_sec=300.0,
    best_metric=55.0,
    best_epoch=0,
)
LOG = dict(epoch=0, step=10, steps=40, loss=1.234, lr=0.05, img_per_sec=321.0, data_time=0.1, elapsed=2.0)


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal_unless_asked():
    assert use_bar("auto", Tty()) and not use_bar("auto", io.StringIO())
    assert use_bar("bar", io.StringIO()) and not use_bar("lines", Tty())
    assert not use_bar("auto", None) and not use_bar("bar", None)  # Tune trials: no console at all


def test_bar_line_shows_position_metrics_and_eta():
    r = BarRenderer(io.StringIO(), num_epochs=3)
    r.handle("log", LOG)
    line = r.bar_line(0, 20, 40, elapsed=4.0, done_before=0)  # 5 batches/s, 20 left -> 4 s
    assert line.startswith("Epoch 0/2 [" + "#" * 12 + "." * 12 + "] 20/40")
    assert "loss 1.2340" in line and "lr 5.000e-02" in line and "321 img/s" in line and line.endswith("ETA 0:04")


def test_eta_counts_only_batches_done_since_a_resume():
    r = BarRenderer(io.StringIO(), num_epochs=1)
    resumed = r.bar_line(0, 30, 40, 2.0, 20)  # 10 batches in 2 s since the resume, 10 left
    just_started = r.bar_line(0, 20, 40, 0.0, 20)
    assert resumed.endswith("ETA 0:02") and just_started.endswith("ETA ?")


def test_permanent_lines_clear_the_bar_first():
    out = Tty()
    r = BarRenderer(out, num_epochs=2)
    r.handle("tick", dict(epoch=0, step=5, steps=40, elapsed=1.0))
    r.handle("text", "2 training worker(s) on 1 node(s), device cpu")
    r.handle("epoch", EPOCH)
    r.close()
    text = out.getvalue()
    assert text.startswith("\rEpoch 0/1 [") and "\x1b[K" in text
    assert "\r\x1b[K2 training worker(s) on 1 node(s), device cpu\n" in text
    assert "Epoch 0/1: train_loss 1.5000" in text and text.endswith("\n")
    assert "loss" not in r.bar_line(1, 1, 40, 1.0, 0).split("]")[1]  # the last epoch's loss is not carried over


def test_board_state_drains_in_order_and_bounds_ticks():
    b = BoardState()
    b.push("text", "a")
    b.push("tick", {"step": 1})
    assert b.drain() == [("text", "a"), ("tick", {"step": 1})] and b.drain() == []
    for i in range(BoardState.MAX_EVENTS + 5):
        b.push("tick", {"step": i})
    b.push("epoch", EPOCH)  # never dropped
    events = b.drain()
    assert len(events) == BoardState.MAX_EVENTS + 1 and events[-1][0] == "epoch"


def test_live_display_draws_what_the_board_gets_and_survives_errors():
    board, out = BoardState(), Tty()
    calls = {"n": 0}
    failed_once = threading.Event()

    def drain():
        calls["n"] += 1
        if calls["n"] == 1:
            failed_once.set()
            raise ConnectionError("actor gone for a moment")
        return board.drain()

    display = LiveDisplay(drain, BarRenderer(out, num_epochs=1)).start()
    board.push("log", LOG)
    # The display's own thread meets the error, however slow the machine (not a fixed sleep that hopes it did).
    assert failed_once.wait(30)
    board.push("epoch", EPOCH)
    display.stop()
    text = out.getvalue()
    assert "10/40" in text and "Epoch 0/0: train_loss" in text


def test_worker_console_without_a_board_prints_plain_lines(capsys):
    c = WorkerConsole(None, num_epochs=2)
    c.say("hello")
    c.step(LOG)
    c.tick(0, 1, 40, 0.1, 0)  # nothing: ticks exist only for a bar
    c.epoch(EPOCH)
    out = capsys.readouterr().out.splitlines()
    assert (
        out == ["hello", out[1], out[2]]
        and out[1].startswith("Train: 0/1 [  10/40")
        and out[2].startswith("Epoch 0/1: train_loss")
    )
    assert "\r" not in "".join(out)


NOISE = (
    "[2026-12-06 23:50:07,892 E 27321 27351] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: '6e95b881a44d22cfb7da6ef702000000' has constructor arguments in the object store and max_restarts > 0. If "
    "the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)


def test_rays_noise_is_dropped_from_what_the_driver_prints_and_nothing_else():
    """Through Ray's own dispatcher of forwarded output, with a printer registered under the name ray.init gives
    its own (pinned below): the PreemptionWatcher error line of every run is dropped, other lines pass as they
    came, and a second call does not wrap twice."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raytrain_cls.run.console import RAY_PRINT_HANDLER, drop_ray_noise

    printed = []
    before = list(dispatcher.handlers)
    dispatcher.add_handler(RAY_PRINT_HANDLER, printed.append)
    try:
        drop_ray_noise()
        drop_ray_noise()
        assert [name for name, _ in dispatcher.handlers].count(RAY_PRINT_HANDLER) == 1
        batch = dict(pid=1, is_err=True, job="01000000")
        dispatcher.emit(
            dict(batch, lines=[NOISE, "Epoch 0/3: train_loss 1.2", NOISE.replace("PreemptionWatcher", "MyActor")])
        )
        dispatcher.emit(dict(batch, lines=[NOISE]))  # nothing left: no empty batch printed
        kept = ["Epoch 0/3: train_loss 1.2", NOISE.replace("PreemptionWatcher", "MyActor")]
        assert printed == [dict(batch, lines=kept)]
    finally:
        dispatcher.handlers = before


def test_ray_init_prints_forwarded_output_through_the_handler_name_the_filter_looks_for():
    import inspect

    import ray._private.worker

    from raytrain_cls.run.console import RAY_PRINT_HANDLER

    source = inspect.getsource(ray._private.worker.connect)
    assert f'global_worker_stdstream_dispatcher.add_handler(\n                "{RAY_PRINT_HANDLER}"' in source
