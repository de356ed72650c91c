"""Elastic training's Ray side: a resize of a running worker group loses nothing.

Ray Train 2.60 resizes an elastic run (ScalingConfig(num_workers=(MIN, MAX))) by stopping its worker group and
starting one of the new size from the latest checkpoint. A shrink comes from a lost node, and a drained node gives
notice first (run/preemption.py writes a checkpoint at once). A grow has no notice: the controller decides it on
its own, every elastic_resize_monitor_interval_s. So the controller is asked to wait: ``ResizeCheckpoint``, a
controller callback, sees the controller leave its running state for a resize, posts a checkpoint request on a
small named actor, and holds the controller until a checkpoint newer than the request's time is complete in the
run directory (or ``WAIT_S`` passes). The workers look for a request every --preemption-check-interval updates, as
they look for preemption notices. The controller's sight of the checkpoint is the run directory, not the worker's
report: a blocked controller takes no reports, and a worker's report waits for the previous one to be taken.

The controller registers that checkpoint only when it next polls the workers, which a resize never does; the
restarted workers therefore continue from the newest complete checkpoint in the run directory
(checkpointer.newest_written), not only from the ones Ray registered.

Ray internals this leans on (tests/unit/test_elastic.py fails when an upgrade changes them): a ControllerCallback
in RunConfig(callbacks) is invoked by the controller, its after_controller_state_update hook, and the
RunningState -> ResizingState transition of a running group's resize.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional

from raytrain_cls.run.checkpointer import from_rank_zero, newest_written
from raytrain_cls.run.console import NAMESPACE

WAIT_S = 120.0  # the longest a resize waits for its checkpoint (an epoch's validation may come first)
POLL_S = 0.2


class CheckpointRequests:
    """The requests' ledger, plain Python (the actor wraps it): a counter of requests and the last one served."""

    def __init__(self):
        self.requested, self.served = 0, 0

    def request(self) -> int:
        self.requested += 1
        return self.requested

    def wanted(self) -> int:
        """The newest request still unserved, else 0."""
        return self.requested if self.requested > self.served else 0

    def serve(self, request: int) -> None:
        self.served = max(self.served, request)


def create_requests():
    """Start the run's named, CPU-free request actor; returns (its handle, its name). The workers and the callback
    find it by name; the caller holds the handle for the whole fit, since Ray ends an actor with its last handle."""
    import ray

    name = f"checkpoint-requests-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=0)(CheckpointRequests).options(name=name, namespace=NAMESPACE).remote()
    ray.get(actor.wanted.remote())  # up before any worker or controller looks for it
    return actor, name


def find_requests(name: Optional[str]):
    """The actor by name, or None (no elastic run, or its driver and with it the actor are gone)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def resize_callback(name: str, run_dir: str):
    """The controller callback that holds a running group's resize until it has checkpointed."""
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import ResizingState, RunningState

    class ResizeCheckpoint(ControllerCallback):
        def after_controller_state_update(self, previous_state, current_state) -> None:
            if isinstance(previous_state, RunningState) and isinstance(current_state, ResizingState):
                checkpoint_before_resize(name, run_dir)

    return ResizeCheckpoint()


def checkpoint_before_resize(name: str, run_dir: str, wait_s: float = WAIT_S) -> Optional[str]:
    """Post a request and wait until a complete checkpoint newer than the newest one now appears in ``run_dir``;
    returns its name, or None when ``wait_s`` passed first (the resize then loses at most the work since the last
    checkpoint). Never raises: an error here would fail the run instead of resizing it."""
    import ray

    try:
        actor = find_requests(name)
        if actor is None:
            return None
        before = newest_written(run_dir)
        request = ray.get(actor.request.remote())
        start = time.monotonic()
        try:
            while time.monotonic() < start + wait_s:
                found = newest_written(run_dir, after=before.name if before is not None else None)
                if found is not None:
                    say(f"Resizing the worker group after checkpoint {found.name} ({time.monotonic() - start:.1f} s)")
                    return found.name
                time.sleep(POLL_S)
        finally:
            ray.get(actor.serve.remote(request))
        say(f"Resizing the worker group without a new checkpoint: none came within {wait_s:.0f} s")
    except Exception as e:  # the resize must go on whatever happens here
        say(f"Resizing the worker group without a new checkpoint ({type(e).__name__}: {e})")
    return None


def say(text: str) -> None:
    """A line from the controller's process: Ray forwards its output to the driver's console."""
    print(text, flush=True)


class ResizeNotice:
    """The workers' side: every ``interval`` updates rank 0 asks the actor for an unserved request and tells the
    other ranks (a collective: every rank asks at the same update counts). ``check`` is True once per request:
    write a checkpoint now."""

    def __init__(self, name: Optional[str], interval: int, rank: int, world: int):
        self.actor = find_requests(name) if rank == 0 else None
        self.interval = interval if name else 0
        self.rank, self.world = rank, world
        self.handled = 0  # rank 0: the request last answered (the controller marks it served once it sees it)

    def check(self, num_updates: int) -> bool:
        if not self.interval or num_updates % self.interval:
            return False
        return bool(from_rank_zero(self.rank, self.world, self._new_request))

    def _new_request(self) -> bool:
        import ray

        wanted = ray.get(self.actor.wanted.remote()) if self.actor is not None else 0
        if wanted <= self.handled:
            return False
        self.handled = wanted
        return True
