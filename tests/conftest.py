"""Shared test set-up. Unit tests (tests/unit) never start Ray; integration tests share one private local Ray."""
import os

import pytest

# Explicit, so a test never depends on what a previous `ray.init()` on this host left in ~/.ray: token auth stays
# on as in production (Ray 2.60's default for new local clusters).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controller polls workers every 2 s; a worker that dies inside that window can lose the checkpoint it
# just reported. Poll faster so fault tests do not depend on luck.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Never attach to a cluster someone else started on this host.
os.environ.pop("RAY_ADDRESS", None)

RAY_CPUS = 2


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray cluster with 2 CPUs for all integration tests (start-up costs ~5 s)."""
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
