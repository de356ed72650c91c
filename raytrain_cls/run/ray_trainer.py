"""The TorchTrainer class a run uses: Ray's own, less the one piece that cannot work on the cluster at hand.

Ray Train 2.60 starts, with every run, a detached PlacementGroupCleaner actor that asks the cluster's state API
(served by the dashboard) once a second whether the run's controller is still alive, to free the run's placement
group if it died. Where no dashboard runs (Ray installed without [default], as on the GPU images, or a cluster
started with --include-dashboard=false) the question always fails: the cleaner logs "Failed to query Ray Train
Controller actor state" to the driver every second of the run, frees nothing, and when the controller is killed
(a Tune trial ASHA stops) it never learns so and lives on, logging, until the cluster stops. On such a cluster the
run goes without it: a normal end frees the group through the controller as always, and a search frees the groups
of the trials it ends itself (tune._stopped_trial_cleaner).

The probe runs where the run's driver runs, the cleaner on the head node. They can disagree only where the
dashboard listens on the head's loopback (cluster/local) and the driver is on another node: that run then goes
without a cleaner that could have worked, and loses nothing by it. Its placement group still goes with the driver's
job when the driver dies, and a search's driver frees the groups of the trials it stops."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback


def state_api_available(timeout_s: float = 5.0) -> bool:
    """Whether the connected cluster answers Ray's state API, the question the placement-group cleaner asks."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except Exception:  # ServerUnavailable without a dashboard; anything else means the same to the cleaner
        return False
    return True


class TorchTrainerWithoutCleaner(TorchTrainer):
    """TorchTrainer without Ray Train's placement-group cleaner (for clusters without the state API)."""

    def _create_default_callbacks(self):
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, PlacementGroupCleanerCallback)]


def trainer_class() -> type:
    """TorchTrainer where the cluster has the state API, else TorchTrainerWithoutCleaner. Needs ray.init first."""
    return TorchTrainer if state_api_available() else TorchTrainerWithoutCleaner
