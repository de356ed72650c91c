"""ray_trainer: runs on a cluster without the state API go without Ray Train's placement-group cleaner (which could
only log there, every second, and outlive a stopped trial); everything else Ray Train sets up stays. No Ray runs."""

import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from raytrain_cls.run import ray_trainer


def _noop(config):
    pass


def callback_types(cls) -> list[type]:
    trainer = cls(
        _noop, scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=ray.train.RunConfig(callbacks=[])
    )
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_the_trainer_without_cleaner_drops_only_the_cleaner():
    full, trimmed = callback_types(TorchTrainer), callback_types(ray_trainer.TorchTrainerWithoutCleaner)
    assert PlacementGroupCleanerCallback in full  # Ray still adds it: the day it stops, this module can go
    assert trimmed == [t for t in full if t is not PlacementGroupCleanerCallback]


def test_trainer_class_follows_the_state_api(monkeypatch):
    monkeypatch.setattr(ray_trainer, "state_api_available", lambda: True)
    assert ray_trainer.trainer_class() is TorchTrainer
    monkeypatch.setattr(ray_trainer, "state_api_available", lambda: False)
    assert ray_trainer.trainer_class() is ray_trainer.TorchTrainerWithoutCleaner
