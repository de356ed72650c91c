"""Every exception type of raytrain_cls survives pickling.

Ray carries an exception from a worker (or a Tune trial) to the driver by pickling it. Python's default pickling
rebuilds an exception by calling its class with ``args`` (the message alone), so a class whose __init__ takes
anything else fails on the driver, and the user sees "__init__() missing 2 required positional arguments"
instead of the real message. Each class therefore gets an entry below; a new exception class without one fails
this test, so none goes untested.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import raytrain_cls
from raytrain_cls.bench.resize import ResizeBenchError
from raytrain_cls.core.config import ConfigError
from raytrain_cls.core.engine import NonFiniteLossError
from raytrain_cls.core.errors import UserError
from raytrain_cls.core.state import CheckpointError
from raytrain_cls.data.device_transform import BadImage
from raytrain_cls.data.shards import ShardError
from raytrain_cls.data.sources import BadImageError, DataError
from raytrain_cls.run.driver import RunInterrupted, TrainingError
from raytrain_cls.run.tune import SearchInterrupted
from raytrain_cls.run.worker import StopRequested

# Modules that cannot be imported without side effects: __main__ runs the command line.
NOT_IMPORTED = {"raytrain_cls.__main__"}

# Qualified class name -> a representative instance, built with the arguments the project raises it with.
EXAMPLES = {
    "raytrain_cls.core.errors.UserError": lambda: UserError("the data set has no validation split"),
    "raytrain_cls.bench.resize.ResizeBenchError": lambda: ResizeBenchError("no 'Preemption notice' within 120 s"),
    "raytrain_cls.core.config.ConfigError": lambda: ConfigError("optim.lr", -0.1, "must be > 0"),
    "raytrain_cls.core.engine.NonFiniteLossError": lambda: NonFiniteLossError("the loss was NaN for 5 steps"),
    "raytrain_cls.core.state.CheckpointError": lambda: CheckpointError("state.pt is corrupt (sha256 differs)"),
    "raytrain_cls.data.device_transform.BadImage": lambda: BadImage("truncated JPEG"),
    "raytrain_cls.data.shards.ShardError": lambda: ShardError("shard-00003.parquet: sha256 differs"),
    "raytrain_cls.data.sources.DataError": lambda: DataError("no images under /data/train"),
    "raytrain_cls.data.sources.BadImageError": lambda: BadImageError("/data/train/cat/1.jpg", "not an image"),
    "raytrain_cls.run.driver.TrainingError": lambda: TrainingError("rank 1 failed: CUDA out of memory"),
    "raytrain_cls.run.driver.RunInterrupted": lambda: RunInterrupted("/runs/digits-1"),
    "raytrain_cls.run.tune.SearchInterrupted": lambda: SearchInterrupted("/searches/s1", 3, 8),
    "raytrain_cls.run.worker.StopRequested": lambda: StopRequested(),
}


def project_exception_classes() -> dict[str, type]:
    """Qualified name -> class, for every exception class defined at module level anywhere in raytrain_cls."""
    found = {}
    for info in pkgutil.walk_packages(raytrain_cls.__path__, "raytrain_cls."):
        if info.name in NOT_IMPORTED:
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_exception_class_has_an_example():
    classes = project_exception_classes()
    assert sorted(set(classes) - set(EXAMPLES)) == [], "add an entry to EXAMPLES for each new exception class"
    assert sorted(set(EXAMPLES) - set(classes)) == [], "an entry of EXAMPLES names a class that no longer exists"
    for name, build in EXAMPLES.items():
        assert type(build()) is classes[name]


def _example(name: str) -> BaseException:
    error = EXAMPLES[name]()
    error.detail = "set after it was made"  # an attribute beyond __init__'s travels too
    return error


def _assert_same(original: BaseException, copy: BaseException) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    assert copy.args == original.args
    assert vars(copy) == vars(original)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_exception_survives_pickle(name):
    original = _example(name)
    _assert_same(original, pickle.loads(pickle.dumps(original)))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_exception_survives_ray_cloudpickle(name):
    """What Ray itself pickles a worker's exception with (importing it starts no Ray)."""
    from ray import cloudpickle

    original = _example(name)
    _assert_same(original, cloudpickle.loads(cloudpickle.dumps(original)))


def test_a_config_error_keeps_its_key_value_and_reason():
    copy = pickle.loads(pickle.dumps(ConfigError("search.gpus_per_worker", 1.0, "the Ray cluster has 0")))
    assert (copy.key, copy.value, copy.reason) == ("search.gpus_per_worker", 1.0, "the Ray cluster has 0")
    assert str(copy) == "config error: search.gpus_per_worker = 1.0: the Ray cluster has 0"
