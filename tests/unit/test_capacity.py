"""capacity.py: on an autoscaling cluster a run is sized by what the autoscaler can add, not only by the nodes that
are up (the GPU nodes of cluster/autoscaler/aws-gpu.yaml start at 0). No Ray runs: the limits are given, or read from
the cluster launcher's YAML, our own aws-gpu.yaml among them."""
import math
from pathlib import Path

import pytest
import yaml

from raytrain_cls.capacity import UNLIMITED, bootstrap_limits, cluster_capacity
from raytrain_cls.config import ConfigError, load_config
from raytrain_cls.trainer import resolve_scaling

AWS_GPU = Path(__file__).parents[2] / "cluster" / "autoscaler" / "aws-gpu.yaml"


def test_our_aws_gpu_cluster_can_grow_to_four_gpus_on_a_head_without_cpus():
    assert bootstrap_limits(AWS_GPU) == {"CPU": 0 + 4 * 8, "GPU": 4}


def test_the_cluster_wide_max_workers_caps_each_node_type(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump({"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}}, "gpu": {"max_workers": 10, "resources": {"CPU": 8, "GPU": 8}}}}))
    assert bootstrap_limits(path) == {"CPU": 4 + 2 * 8, "GPU": 2 * 8}


@pytest.mark.parametrize("text", [None, "not: [yaml", "cluster_name: x\n", "available_node_types: {a: {}}\n"])
def test_no_usable_launcher_yaml_means_no_limits(tmp_path, text):
    path = tmp_path / "ray_bootstrap_config.yaml"
    if text is not None:
        path.write_text(text)
    assert bootstrap_limits(path) is None


def test_capacity_is_the_larger_of_now_and_the_autoscalers_reach():
    now = {"CPU": 4.0, "memory": 1e9}
    assert cluster_capacity(now, {"CPU": 2, "GPU": 4}) == {"CPU": 4.0, "GPU": 4.0, "memory": 1e9}
    assert cluster_capacity(now, {}) == now  # no autoscaler: what is there
    assert cluster_capacity(now, {"GPU": UNLIMITED})["GPU"] == math.inf  # Ray's -1


def test_a_gpu_job_on_the_autoscaling_cluster_is_sized_by_what_it_can_add():
    # Before: {"CPU": 0} alone refused every GPU run ("the Ray cluster has no GPUs") on aws-gpu.yaml's fresh head.
    capacity = cluster_capacity({"CPU": 0.0}, bootstrap_limits(AWS_GPU))
    cfg = load_config("digits", {})
    assert resolve_scaling(cfg, capacity) == (True, 4)  # one worker per GPU it can have
    cfg = load_config("digits", {"num_workers": 2, "use_gpu": True})
    assert resolve_scaling(cfg, capacity) == (True, 2)
    with pytest.raises(ConfigError, match="needs 5 GPUs"):
        resolve_scaling(load_config("digits", {"num_workers": 5, "use_gpu": True}), capacity)


def test_without_a_gpu_limit_the_worker_count_must_be_given():
    capacity = cluster_capacity({"CPU": 0.0}, {"CPU": UNLIMITED, "GPU": UNLIMITED})
    with pytest.raises(ConfigError) as e:
        resolve_scaling(load_config("digits", {}), capacity)
    assert e.value.key == "scaling.num_workers" and "--num-workers" in str(e.value)
    assert resolve_scaling(load_config("digits", {"num_workers": 16}), capacity) == (True, 16)


def test_a_search_runs_as_many_trials_at_once_as_the_cluster_can_grow_to():
    from raytrain_cls.tune import MAX_DEFAULT_CONCURRENCY, SearchSpec, default_concurrency

    quarter_gpu = SearchSpec(gpus_per_worker=0.25, cpus_per_worker=2)
    aws = cluster_capacity({"CPU": 0.0}, bootstrap_limits(AWS_GPU))  # 4 GPUs, 32 CPUs once grown
    assert default_concurrency(quarter_gpu, aws) == 16
    assert default_concurrency(SearchSpec(), {"CPU": 2.0}) == 2
    unlimited = cluster_capacity({"CPU": 0.0}, {"CPU": UNLIMITED, "GPU": UNLIMITED})
    assert default_concurrency(quarter_gpu, unlimited) == MAX_DEFAULT_CONCURRENCY
