"""capacity.py: on an autoscaling cluster a run is sized by what the autoscaler can add, not only by the nodes that
are up (the GPU nodes of cluster/autoscaler/aws-gpu.yaml start at 0). No Ray runs: the limits are given, or read from
the cluster launcher's YAML (our own aws-gpu.yaml among them) and from the command lines of a made-up /proc. A live
autoscaler is in tests/e2e/test_autoscaling_cluster.py."""

import math
from pathlib import Path

import pytest
import yaml

from raytrain_cls.core.config import ConfigError, load_config
from raytrain_cls.run import capacity as cap
from raytrain_cls.run.capacity import (
    UNLIMITED,
    Capacity,
    cluster_capacity,
    config_limits,
    has,
    monitor_config,
    waiting_note,
)
from raytrain_cls.run.driver import resolve_scaling

AWS_GPU = Path(__file__).parents[2] / "cluster" / "autoscaler" / "aws-gpu.yaml"


def test_our_aws_gpu_cluster_can_grow_to_four_gpus_on_a_head_without_cpus():
    assert config_limits(AWS_GPU) == {"CPU": 0 + 4 * 8, "GPU": 4}


def test_the_cluster_wide_max_workers_caps_each_node_type(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "max_workers": 2,
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 4}},
                    "gpu": {"max_workers": 10, "resources": {"CPU": 8, "GPU": 8}},
                },
            }
        )
    )
    assert config_limits(path) == {"CPU": 4 + 2 * 8, "GPU": 2 * 8}


@pytest.mark.parametrize("text", [None, "not: [yaml", "cluster_name: x\n", "available_node_types: {a: {}}\n"])
def test_no_usable_launcher_yaml_means_no_limits(tmp_path, text):
    path = tmp_path / "ray_bootstrap_config.yaml"
    if text is not None:
        path.write_text(text)
    assert config_limits(path) is None


def test_capacity_is_the_larger_of_now_and_the_autoscalers_reach():
    now = {"CPU": 4.0, "memory": 1e9}
    assert cluster_capacity(now, {"CPU": 2, "GPU": 4}) == {"CPU": 4.0, "GPU": 4.0, "memory": 1e9}
    assert cluster_capacity(now, {}) == now  # no autoscaler: what is there
    assert cluster_capacity(now, {"GPU": UNLIMITED})["GPU"] == math.inf  # Ray's -1


def test_a_gpu_job_on_the_autoscaling_cluster_is_sized_by_what_it_can_add():
    # Before: {"CPU": 0} alone refused every GPU run ("the Ray cluster has no GPUs") on aws-gpu.yaml's fresh head.
    capacity = cluster_capacity({"CPU": 0.0}, config_limits(AWS_GPU))
    cfg = load_config("digits", {})
    assert resolve_scaling(cfg, capacity)[:2] == (True, 4)  # one worker per GPU it can have
    cfg = load_config("digits", {"num_workers": 2, "use_gpu": True})
    assert resolve_scaling(cfg, capacity)[:2] == (True, 2)
    with pytest.raises(ConfigError, match="needs 5 GPUs"):
        resolve_scaling(load_config("digits", {"num_workers": 5, "use_gpu": True}), capacity)


def test_without_a_gpu_limit_the_worker_count_must_be_given():
    capacity = cluster_capacity({"CPU": 0.0}, {"CPU": UNLIMITED, "GPU": UNLIMITED})
    with pytest.raises(ConfigError) as e:
        resolve_scaling(load_config("digits", {}), capacity)
    assert e.value.key == "scaling.num_workers" and "--num-workers" in str(e.value)
    assert resolve_scaling(load_config("digits", {"num_workers": 16}), capacity)[:2] == (True, 16)


def test_a_search_runs_as_many_trials_at_once_as_the_cluster_can_grow_to():
    from raytrain_cls.run.tune import MAX_DEFAULT_CONCURRENCY, SearchSpec, default_concurrency

    quarter_gpu = SearchSpec(gpus_per_worker=0.25, cpus_per_worker=2)
    aws = cluster_capacity({"CPU": 0.0}, config_limits(AWS_GPU))  # 4 GPUs, 32 CPUs once grown
    assert default_concurrency(quarter_gpu, aws) == 16
    assert default_concurrency(SearchSpec(), {"CPU": 2.0}) == 2
    unlimited = cluster_capacity({"CPU": 0.0}, {"CPU": UNLIMITED, "GPU": UNLIMITED})
    assert default_concurrency(quarter_gpu, unlimited) == MAX_DEFAULT_CONCURRENCY


# ---- the running autoscaler's own config file ----------------------------------------------------------------
def fake_proc(tmp_path, processes: dict) -> Path:
    """A /proc with one folder per pid holding its NUL-separated cmdline."""
    proc = tmp_path / "proc"
    for pid, args in processes.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes("\0".join(args).encode() + b"\0")
    (proc / "self").mkdir()  # not a pid: skipped
    return proc


def monitor_args(version: str, port: int, config: str) -> list:
    script = f"/venv/lib/python3.11/site-packages/ray/autoscaler/{'v2' if version == 'v2' else '_private'}/monitor.py"
    return [
        "/venv/bin/python3",
        "-u",
        script,
        "--logs-dir=/tmp/ray/session_x/logs",
        f"--gcs-address=10.0.0.5:{port}",
        f"--autoscaling-config={config}",
        "--monitor-ip=10.0.0.5",
    ]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_autoscaler_serving_this_clusters_gcs_port_names_its_config(tmp_path, version):
    proc = fake_proc(
        tmp_path,
        {
            11: ["/venv/bin/python3", "train.py", "--autoscaling-config=/wrong.yaml"],  # not a monitor
            12: monitor_args(version, 6380, "/other-cluster.yaml"),  # another cluster on this host
            13: monitor_args(version, 6379, "~/ray_bootstrap_config.yaml"),  # `ray up` passes it unexpanded
        },
    )
    assert monitor_config(6379, proc) == Path("~/ray_bootstrap_config.yaml").expanduser()
    assert monitor_config(6380, proc) == Path("/other-cluster.yaml")
    assert monitor_config(6390, proc) is None
    assert monitor_config(6379, tmp_path / "no-proc") is None


def test_a_relative_config_path_is_read_from_the_monitors_working_directory(tmp_path):
    proc = fake_proc(tmp_path, {21: monitor_args("v2", 6379, "cluster.yaml")})
    (proc / "21" / "cwd").symlink_to(tmp_path / "where-ray-start-ran")
    assert monitor_config(6379, proc) == tmp_path / "where-ray-start-ran" / "cluster.yaml"


def test_limits_come_from_the_gcs_then_the_monitors_file_then_the_launchers_file(tmp_path, monkeypatch):
    monitor_yaml, bootstrap_yaml = tmp_path / "monitor.yaml", tmp_path / "bootstrap.yaml"
    for path, gpus in ((monitor_yaml, 2), (bootstrap_yaml, 8)):
        path.write_text(
            yaml.safe_dump(
                {
                    "max_workers": 1,
                    "head_node_type": "h",
                    "available_node_types": {
                        "h": {"resources": {"CPU": 0}},
                        "g": {"max_workers": 1, "resources": {"GPU": gpus}},
                    },
                }
            )
        )
    monkeypatch.setattr(cap, "BOOTSTRAP_CONFIG", bootstrap_yaml)
    monkeypatch.setattr(cap, "monitor_config", lambda port: monitor_yaml if port == 6379 else None)
    monkeypatch.setattr(cap, "gcs_limits", lambda: {"GPU": 16})
    assert cap.autoscaler_limits(6379) == ({"GPU": 16}, "the cluster config in the GCS")
    monkeypatch.setattr(cap, "gcs_limits", lambda: None)
    assert cap.autoscaler_limits(6379) == ({"CPU": 0, "GPU": 2}, str(monitor_yaml))
    assert cap.autoscaler_limits(6380) == ({"CPU": 0, "GPU": 8}, str(bootstrap_yaml))
    monkeypatch.setattr(cap, "BOOTSTRAP_CONFIG", tmp_path / "missing.yaml")
    assert cap.autoscaler_limits(6380) == (None, None)


@pytest.mark.parametrize(
    "text, limits",
    [("GPU=4,CPU=32", {"GPU": 4, "CPU": 32}), (" GPU = 0.5 , TPU=-1 ", {"GPU": 0.5, "TPU": UNLIMITED}), ("", None)],
)
def test_limits_named_in_the_environment_come_first(monkeypatch, text, limits):
    monkeypatch.setenv(cap.LIMITS_ENV, text)
    monkeypatch.setattr(cap, "gcs_limits", lambda: {"GPU": 16})
    assert cap.env_limits() == limits
    assert cap.autoscaler_limits(6379) == (
        (limits, f"${cap.LIMITS_ENV}") if limits else ({"GPU": 16}, "the cluster config in the GCS")
    )


@pytest.mark.parametrize("text", ["GPU", "GPU=four", "=4", "GPU=-3"])
def test_a_malformed_limits_variable_is_a_config_error_naming_it(monkeypatch, text):
    monkeypatch.setenv(cap.LIMITS_ENV, text)
    with pytest.raises(ConfigError) as e:
        cap.env_limits()
    assert cap.LIMITS_ENV in e.value.key and "GPU=4,CPU=32" in e.value.reason


def test_a_run_that_waits_for_the_autoscaler_says_so_and_refusals_say_what_is_up():
    capacity = cluster_capacity({"CPU": 0.0}, config_limits(AWS_GPU), limits_from=str(AWS_GPU))
    note = waiting_note(capacity, {"GPU": 2, "CPU": 2})
    assert "2 GPU (0 up)" in note and "2 CPU (0 up)" in note and str(AWS_GPU) in note
    assert waiting_note(cluster_capacity({"CPU": 2.0, "GPU": 2.0}, None), {"GPU": 2, "CPU": 2}) is None
    assert waiting_note(Capacity({"CPU": 2.0}), {"CPU": 4}) is None  # no autoscaler: refused before, never waits
    assert (
        has(capacity, "GPU") == f"the Ray cluster has 0 now and its autoscaler can add up to 4 in all "
        f"(limits from {AWS_GPU})"
    )
    assert has(Capacity({"CPU": 2.0}), "CPU") == "the Ray cluster has 2"
    with pytest.raises(ConfigError) as e:  # the refusal names the way to tell the driver what it cannot read
        resolve_scaling(load_config("digits", {"use_gpu": True}), Capacity({"CPU": 2.0}))
    assert cap.LIMITS_ENV in str(e.value)


def capacity_of(*node_cpus: float) -> Capacity:
    capacity = cluster_capacity({"CPU": float(sum(node_cpus))})
    capacity.node_cpus = list(node_cpus)
    return capacity


@pytest.mark.parametrize(
    "nodes,flat,expected",
    [
        ((2.0,), {}, (1, {"CPU": 2})),  # one host: one worker with every core as its threads
        ((16.0, 16.0, 8.0), {}, (3, {"CPU": 8})),  # one per node, each fitting the smallest node
        ((0.0, 4.0), {}, (1, {"CPU": 4})),  # a head without CPUs holds no worker
        ((4.0,), {"loader": "ray", "dataset": "parquet", "data_dir": "/d"}, (1, {"CPU": 3})),  # a CPU for Ray Data
        ((8.0,), {"num_workers": 2}, (2, {})),  # --num-workers: Ray's 1 CPU each, as before
        ((8.0,), {"resources_per_worker": {"CPU": 4}}, (1, {"CPU": 4})),  # a CPU count alone: one such worker
    ],
)
def test_the_default_cpu_layout_fills_a_node_with_one_threaded_worker(nodes, flat, expected):
    use_gpu, num_workers, per_worker = resolve_scaling(load_config("digits", flat), capacity_of(*nodes))
    assert not use_gpu and (num_workers, per_worker) == expected


def test_with_no_cpu_node_up_yet_the_default_is_one_small_worker_for_the_autoscaler_to_place():
    capacity = cluster_capacity({"CPU": 0.0}, {"CPU": 4})
    capacity.node_cpus = [0.0]  # the head alone, without CPUs
    assert resolve_scaling(load_config("digits", {}), capacity) == (False, 1, {"CPU": 1})


def test_the_default_cpu_layout_reaches_ray_and_the_resolved_record():
    from raytrain_cls.run.driver import run_needs

    _, num_workers, per_worker = resolve_scaling(load_config("digits", {}), capacity_of(2.0))
    assert run_needs(per_worker, False, num_workers) == {"GPU": 0, "CPU": 2}
    assert resolve_scaling(load_config("digits", {}), {"CPU": 6.0})[1:] == (1, {"CPU": 6})  # no node list: the total
