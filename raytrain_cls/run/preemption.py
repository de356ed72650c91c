"""Just-in-time checkpoints on a preemption notice.

When a node is about to go (a spot instance reclaimed, the autoscaler or KubeRay draining it), Ray marks it as
draining, often with a deadline, and Ray Train 2.60 watches for that on the nodes of a run's workers. The workers
learn of it through ``ray.train.get_preemption_info()``. A run that checkpoints at once on the first notice loses
nothing when the node then dies: Ray Train restarts the worker group (counted against FailureConfig's
max_preemption_failures, not max_failures) and it resumes from that checkpoint, mid-epoch, at the same sample.

``get_preemption_info`` is a collective (rank 0's answer is broadcast): every rank must ask equally often, so the
question is asked every N optimizer updates, a count all ranks share, never on a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional


def ask_ray_train():
    """Ray Train's current preemption info for this run (None: no node of it is being preempted)."""
    import ray.train

    return ray.train.get_preemption_info()


class PreemptionNotice:
    """Asks every ``interval`` updates (0: never) whether a node of the run is being preempted. ``check`` returns a
    description the first time a node is announced (a checkpoint is due), else None; a node announced later is
    news again."""

    def __init__(self, interval: int, ask: Optional[Callable] = None):
        self.interval = interval
        self.ask = ask or ask_ray_train
        self.announced: set[str] = set()

    def check(self, num_updates: int) -> Optional[str]:
        if not self.interval or num_updates % self.interval:
            return None
        info = self.ask()
        if info is None:
            return None
        new = sorted(set(info.preempted_node_ids) - self.announced)
        if not new:
            return None
        self.announced.update(new)
        return describe(info, new)


def describe(info, nodes: list[str]) -> str:
    ranks = sorted({r for n in nodes for r in info.preempted_node_to_ranks.get(n, ())})
    text = f"node {', '.join(n[:12] for n in nodes)} (rank {', '.join(map(str, ranks))}) is being preempted"
    if info.deadline_ms:
        text += f", deadline in {max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s"
    return text
