"""The command's private local Ray: its one owner (started here, by the command's process, gone with it).

A command without RAY_ADDRESS starts a fresh local Ray for itself, after every check that needs no cluster.
``start_private_ray`` also asks for Ray Data's autoscaling coordinator as soon as the node is up. Every Ray Train
controller gets or creates that actor before it starts its workers; created here, its process starts while the
controller's does instead of after it (2-core machine: controller + worker group 2.8 -> 2.0 s, docs/benchmarks.md
"Start-up"). On a long-lived cluster the coordinator (a detached actor) lives from the first run on, so a
cluster named by RAY_ADDRESS is left as it is.
"""

from __future__ import annotations

# The address of the Ray this process started, while it runs: a connect() after it must not mistake it for a
# cluster with an autoscaler to ask.
_started: list[str] = []


def start_private_ray(for_ray_train: bool = True) -> None:
    """A fresh local Ray for this process alone, without the dashboard; ``for_ray_train``: ask for the coordinator
    Ray Train's controller will want (plain Ray tasks, as eval's, have no use for its process).

    address="local" always starts a fresh cluster: a bare ray.init() would silently join any cluster running on
    this host, and trip over the stale address file of one that was stopped. The dashboard's start took a core
    for ~1 s of the start-up (2 cores: 13.4 -> 12.1-13.1 s to the first step); cluster/local/start-head.sh keeps
    one with the dashboard alive across commands (RAY_ADDRESS)."""
    import ray

    context = ray.init(address="local", log_to_driver=True, configure_logging=False, include_dashboard=False)
    _started[:] = [context.address_info["gcs_address"]]
    if for_ray_train:
        create_autoscaling_coordinator()


def started_private_ray() -> bool:
    """Whether the Ray this process is connected to is the private one it started."""
    import ray

    if not ray.is_initialized() or not _started:
        return False
    return ray.get_runtime_context().gcs_address == _started[0]


def create_autoscaling_coordinator() -> None:
    """Ask for Ray Data's AutoscalingCoordinator now (a named, detached actor; the call returns at once). Ray Train's
    scaling policy gets or creates the same actor when the controller starts (pinned in test_startup_cuts)."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()
