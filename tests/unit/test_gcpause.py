"""core/gcpause.py: the garbage collector held off through torch's and timm's imports, in the driver and in every Ray
Train worker, and given back (frozen first only in a process that is ours alone). No Ray runs."""

import gc
import importlib

import pytest

from raytrain_cls.core.config import load_config
from raytrain_cls.core.gcpause import collector_held, hold_collector, release_collector


@pytest.fixture(autouse=True)
def collector_restored():
    """Each test starts and ends with the collector on and nothing frozen (the suite's process lives on)."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


@pytest.mark.parametrize("freeze", [True, False])
def test_the_collector_is_off_inside_and_on_again_after(freeze):
    with collector_held(freeze=freeze):
        assert not gc.isenabled()
    assert gc.isenabled()
    assert (gc.get_freeze_count() > 0) is freeze


def test_the_collector_comes_back_when_the_block_raises():
    with pytest.raises(ImportError), collector_held(freeze=False):
        import raytrain_cls_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_a_collector_someone_else_turned_off_stays_off_and_nothing_is_frozen():
    gc.disable()
    with collector_held(freeze=True):
        pass
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_a_worker_holds_it_from_its_start_and_its_train_function_gives_it_back():
    hold_collector()
    assert not gc.isenabled()
    release_collector()
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_release_does_nothing_where_nothing_was_held():
    """A local run's or an in-process trial's loop: the process lives on, its garbage stays collectable."""
    release_collector()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_train_function_releases_before_anything_else():
    """Before it even looks for its Ray Train context: a worker whose set-up fails is not left without a
    collector either (here there is no Ray Train context, so the function fails right after)."""
    from raytrain_cls.run.worker_entry import train_loop_per_worker  # what Ray Train runs: the loop's imports first

    hold_collector()
    with pytest.raises(RuntimeError, match="outside of a Ray Train training function"):
        train_loop_per_worker({})
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_every_train_worker_process_gets_the_hold_as_its_set_up_hook():
    from raytrain_cls.run.driver import resolve, worker_runtime_env

    env = worker_runtime_env(resolve(load_config("digits", {}), {"CPU": 2.0}), job_env={})
    module, _, name = env["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is hold_collector  # Ray imports it by this name
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


@pytest.mark.parametrize(
    "job_env",
    [
        {"worker_process_setup_hook": "logging.basicConfig"},
        {"env_vars": {"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "logging.basicConfig"}},
    ],
)
def test_a_jobs_own_set_up_hook_is_left_to_run(job_env):
    """A worker process runs one hook: where the job has its own (ray.init or `ray job submit` runtime env), ours
    stays out, since a worker's hook would replace the job's."""
    from raytrain_cls.run.driver import resolve, worker_runtime_env

    env = worker_runtime_env(resolve(load_config("digits", {}), {"CPU": 2.0}), job_env=job_env)
    assert "worker_process_setup_hook" not in env and "RAY_TRAIN_ENABLE_PRINT_PATCH" in env["env_vars"]


def test_rays_name_for_a_taken_in_set_up_hook_is_still_the_one_we_look_for():
    from ray._private import ray_constants

    from raytrain_cls.run.driver import SETUP_HOOK_ENV

    assert ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR == SETUP_HOOK_ENV


TRIAL_PROCESS = """
import gc, sys
import ray  # a Tune trial's actor process has Ray already
import raytrain_cls.run.trial as trial
light = not {"torch", "timm"} & set(sys.modules)
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
trial.import_run_side(trial.RAY_TRAIN_SIDE)
print(light, "torch" in sys.modules and set(trial.RAY_TRAIN_SIDE) <= set(sys.modules), len(full), gc.isenabled(),
      gc.get_freeze_count() > 0, "timm" in sys.modules)
"""


def test_a_trials_process_imports_the_run_side_with_the_collector_held_and_freezes_it():
    """What Tune unpickles in every trial's fresh process (run/trial.py) imports neither torch nor timm; the first
    trial imports the Ray Train side (the driver, Ray Train's torch trainer) with no full collection on the way (six
    with the collector on, when that side had timm too), then freezes them. timm is not part of it: only the train
    workers and the checks before Ray (run/preflight.py) need it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TRIAL_PROCESS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", "0", "True", "True", "False"], out.stdout
