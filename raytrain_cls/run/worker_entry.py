"""The train function as the driver hands it to Ray Train: a reference into this module, which imports nothing.

Ray Train pickles the function by reference; whoever unpickles it imports its module. Naming the loop in
run/worker.py directly made every process that builds a trainer import the worker's modules (torch, timm, the
whole loop) just to name it, a Tune trial's process included, which never runs the loop itself. A train worker
imports this module as it receives the function, the moment the start-up breakdown's "worker start" ends, and the
loop's own modules when the function is called, with the garbage collector still held (core/gcpause.py).
"""

from __future__ import annotations

import time

IMPORTED_AT = time.time()


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's train function on every worker: run/worker.py's loop."""
    from raytrain_cls.run.worker import run_ray_worker

    return run_ray_worker(config, imported_at=IMPORTED_AT)
