"""ray_trainer: a run goes without Ray Train's placement-group cleaner, and without its dataset manager when it passes
no Ray dataset; everything else Ray Train sets up stays. These are Ray internals: the pins below fail when a Ray
upgrade renames, drops or changes them, so that run/ray_trainer.py is looked at again. No Ray runs."""

import inspect

import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

from raytrain_cls.run.ray_trainer import RunTrainer


def _noop(config):
    pass


def callback_types(cls, datasets=None) -> list[type]:
    trainer = cls(
        _noop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(callbacks=[]),
        datasets=datasets,
    )
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_ray_still_adds_both_helpers_by_default():
    full = callback_types(TorchTrainer)
    assert PlacementGroupCleanerCallback in full and DatasetsCallback in full  # the day one goes, so can its filter


def test_a_run_without_datasets_goes_without_the_cleaner_and_the_dataset_manager():
    full, trimmed = callback_types(TorchTrainer), callback_types(RunTrainer)
    assert trimmed == [t for t in full if t not in (PlacementGroupCleanerCallback, DatasetsCallback)]


def test_a_run_with_a_ray_dataset_keeps_the_dataset_manager():
    datasets = {"train": lambda: None}  # a dataset factory: Ray calls it only when the workers start
    full, trimmed = callback_types(TorchTrainer, datasets), callback_types(RunTrainer, datasets)
    assert DatasetsCallback in trimmed
    assert trimmed == [t for t in full if t is not PlacementGroupCleanerCallback]


def test_workers_start_without_a_dataset_shard_provider():
    """Without DatasetsCallback nobody hands the workers a shard provider: Ray's worker must default it."""
    parameter = inspect.signature(RayTrainWorker.init_train_context).parameters["dataset_shard_provider"]
    assert parameter.default is None
