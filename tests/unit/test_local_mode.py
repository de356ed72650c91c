"""Local mode (`train --num-workers 0`, Ray Train's ScalingConfig(num_workers=0) convention): what it is resolved to
on this machine, what it refuses before anything starts, its console and start-up line, and that the driver it
goes through never imports Ray. The real runs (train, resume, a killed process) are in
tests/integration/test_local_run.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from raytrain_cls.core.config import ConfigError, load_config
from raytrain_cls.run.capacity import Capacity, has, local_capacity
from raytrain_cls.run.console import BarRenderer, WorkerConsole
from raytrain_cls.run.driver import resolve_scaling, workers_phrase
from raytrain_cls.run.startup import LOCAL_PHASES, breakdown, describe

MACHINE = Capacity({"CPU": 4.0, "GPU": 0.0}, node_cpus=[4.0], holder="this machine")


def local(**overrides):
    return load_config("digits", {"num_workers": "0", **overrides}).validate()


def test_zero_workers_is_local_mode_and_an_elastic_range_cannot_start_at_zero():
    assert local().scaling.local_mode
    assert not load_config("digits", {"num_workers": "1"}).scaling.local_mode
    with pytest.raises(ConfigError, match="scaling.num_workers.*MIN >= 1"):
        load_config("digits", {"num_workers": "0:2"}).validate()


@pytest.mark.parametrize(
    "overrides, key, reason",
    [
        (dict(loader="ray", dataset="parquet", data_dir="/x"), "data.loader", "Ray Train workers only"),
        (dict(output="s3://bucket/runs"), "checkpoint.output", "local .or mounted. directory"),
        (dict(resources_per_worker={"GPU": 2}), "scaling.resources_per_worker.GPU", "one GPU at most"),
        (dict(placement_strategy="SPREAD"), "scaling.placement_strategy", "nothing is placed"),
    ],
)
def test_what_one_process_cannot_do_is_refused_by_key_before_anything_starts(overrides, key, reason):
    with pytest.raises(ConfigError, match=f"{key}.*{reason}.*--num-workers 0: local mode"):
        local(**overrides)


def test_one_worker_on_the_machines_cpus_as_threads_or_as_many_as_asked():
    assert resolve_scaling(local(), MACHINE) == (False, 1, {"CPU": 4.0})
    assert resolve_scaling(local(resources_per_worker={"CPU": 2}), MACHINE) == (False, 1, {"CPU": 2})
    with pytest.raises(ConfigError, match="resources_per_worker.CPU.*this machine's CPUs as threads, and it has 4"):
        resolve_scaling(local(resources_per_worker={"CPU": 8}), MACHINE)


def test_a_gpu_where_the_machine_has_one_and_a_clear_error_where_it_has_none():
    gpu_machine = Capacity({"CPU": 16.0, "GPU": 2.0}, node_cpus=[16.0], holder="this machine")
    use_gpu, workers, _ = resolve_scaling(local(), gpu_machine)
    assert use_gpu and workers == 1  # one process, the first GPU (in_process.process_device)
    with pytest.raises(ConfigError, match="scaling.use_gpu.*torch sees no CUDA device"):
        resolve_scaling(local(use_gpu=True), MACHINE)
    with pytest.raises(ConfigError, match="model.sync_bn.*one process"):
        resolve_scaling(local(sync_bn=True), gpu_machine)
    with pytest.raises(ConfigError, match="precision.amp_dtype.*GPUs"):
        resolve_scaling(local(amp=True, amp_dtype="float16"), MACHINE)


def test_the_machine_is_the_cpus_this_process_may_use_and_the_gpus_torch_sees():
    machine = local_capacity()
    assert machine["CPU"] == len(os.sched_getaffinity(0)) and machine.node_cpus == [machine["CPU"]]
    assert machine["GPU"] == torch.cuda.device_count()
    assert has(machine, "CPU") == f"this machine has {machine['CPU']:g}"


def test_the_start_line_says_where_the_run_trains():
    cfg = local()
    use_gpu, workers, per_worker = resolve_scaling(cfg, MACHINE)
    resolved = type("R", (), dict(use_gpu=use_gpu, num_workers=workers, min_workers=None))()
    resolved.resources_per_worker = per_worker
    assert workers_phrase(resolved) == "1 CPU worker (4 CPUs)"


def test_a_bar_drawn_in_this_process_gets_rank_0s_events_without_any_actor():
    out = io.StringIO()
    renderer = BarRenderer(out, num_epochs=1)
    console = WorkerConsole(None, num_epochs=1, draw=renderer.handle)
    console.say("hello")
    console.tick(0, 5, 10, 1.0, 0)
    console.epoch(dict(epoch=0, train_loss=1.0, eval_loss=1.0, eval_top1=50.0, eval_top5=90.0, lr=0.1, img_per_sec=9))
    renderer.close()
    text = out.getvalue()
    assert "hello\n" in text and "\r" in text and "5/10" in text and "Epoch 0/0: train_loss" in text


def test_the_start_up_line_of_a_local_run_names_its_own_phases():
    stamps = {name: 100.0 + i for i, (name, _) in enumerate(LOCAL_PHASES)}
    # the worker's own stamps are this process's: they must not turn up as Ray phases
    stamps.update(worker_process=99.0, worker_imported=100.5, worker_entered=104.5)
    result = breakdown(stamps)
    assert [label for label, _ in result["phases"]] == [label for _, label in LOCAL_PHASES[1:]]
    assert result["total_s"] == len(LOCAL_PHASES) - 1
    assert "Ray" not in describe(result)


def test_the_driver_and_the_worker_loop_import_no_ray():
    """What local mode's speed rests on: the driver's module (its checks) and the loop load without Ray, which the
    driver imports only where a run goes to a cluster (a fresh python; this test process has Ray loaded)."""
    code = (
        "import sys, raytrain_cls.run.driver, raytrain_cls.run.in_process; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
