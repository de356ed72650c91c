"""What a Ray Train run is built from: the TorchTrainer class (Ray's own, less two helper actors that a run of this
project never needs, and with its torch backend handed to the controller through train_controller). This module and
train_controller are the ones of the run side that import ray.train at their top: the driver imports them only when
it builds a trainer, so a local-mode run never loads Ray Train.


Ray Train 2.60 starts, with every ``fit()``, besides the controller and the train workers:

* a detached PlacementGroupCleaner actor, which asks the cluster's state API (served by the dashboard) once a
  second whether the run's controller is still alive, to free the run's placement group should the controller die
  while its driver lives on. The controller waits for it (it registers the workers' group with it) before the train
  function starts, and on a 2-core machine its process start took a worker-start slot of the raylet
  (--maximum_startup_concurrency is the CPU count) ahead of the train worker: Ray Train's empty-function floor went
  from a median 9.7 s to 7.8 s without it (docs/benchmarks.md). Where no dashboard runs it could never work at all:
  it logged "Failed to query Ray Train Controller actor state" every second and outlived stopped trials.
  This project's controllers die only with their driver or as a stopped Tune trial. A driver that ends ends its Ray
  job, and Ray removes a finished job's placement groups; a search frees the group of every trial it ends itself
  (tune._stopped_trial_cleaner). So no run starts the cleaner.
* a DatasetManager actor (one more process) that hands out Ray Data shards: created even when the run passes no
  datasets. A run without ``--loader ray`` goes without it (and cannot ask for a shard, which it never does).

Both are Ray internals (TorchTrainer._create_default_callbacks and the callback classes); tests/unit/
test_ray_trainer.py fails when a Ray upgrade renames or drops them, so that this module is looked at again."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from raytrain_cls.run.train_controller import DeferredTorchConfig


class RunTrainer(TorchTrainer):
    """TorchTrainer without the placement-group cleaner, and without the dataset manager when there is no dataset;
    its controller loads torch while the workers start, not before (train_controller.DeferredTorchConfig)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("torch_config", DeferredTorchConfig())
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        unneeded = [PlacementGroupCleanerCallback]
        if not self.datasets:
            unneeded.append(DatasetsCallback)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, tuple(unneeded))]
