"""preemption.PreemptionNotice: when a worker asks Ray Train about preemption, and when a notice means "checkpoint
now". Ray Train's answer is faked with its own PreemptionInfo class; the real drain is the e2e two-node test's."""

import time

from ray.train.v2.api.preemption import PreemptionInfo

from raytrain_cls.run.preemption import PreemptionNotice


class Answers:
    """Ray Train's answers in turn (the last one repeats), counting the questions."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), 0

    def __call__(self):
        self.asked += 1
        return self.answers[min(self.asked, len(self.answers)) - 1]


def info(*nodes, ranks=None, deadline_s=None):
    return PreemptionInfo(
        deadline_ms=int((time.time() + deadline_s) * 1000) if deadline_s else None,
        preempted_node_to_ranks={n: (ranks or {}).get(n, [1]) for n in nodes},
    )


def test_asks_every_interval_updates_only():
    ask = Answers(None)
    notice = PreemptionNotice(10, ask)
    assert [notice.check(u) for u in range(1, 31)] == [None] * 30
    assert ask.asked == 3  # updates 10, 20, 30: a count every rank shares, so the collective matches up


def test_interval_zero_never_asks():
    ask = Answers(info("a" * 56))
    assert PreemptionNotice(0, ask).check(10) is None and ask.asked == 0


def test_a_node_is_news_once_and_another_node_is_news_again():
    first, second = "a1" * 28, "b2" * 28
    ask = Answers(
        None,
        info(first, ranks={first: [1]}, deadline_s=90),
        info(first),
        info(first, second, ranks={first: [1], second: [2, 3]}),
    )
    notice = PreemptionNotice(1, ask)
    assert notice.check(1) is None
    text = notice.check(2)
    assert text.startswith(f"node {first[:12]} (rank 1) is being preempted, deadline in ")
    assert 85 <= int(text.rsplit(" in ", 1)[1].split()[0]) <= 90
    assert notice.check(3) is None  # the same drain: its checkpoint is written already
    assert notice.check(4) == f"node {second[:12]} (rank 2, 3) is being preempted"  # no deadline given
