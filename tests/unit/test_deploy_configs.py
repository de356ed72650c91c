"""jobs/ recipes and cluster/ manifests: each one validated the way its consumer would, without a cluster."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from raytrain_cls.commands.cli import build_parser, overrides_of
from raytrain_cls.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.stem.startswith("tune_"))
SEARCHES = sorted((ROOT / "jobs").glob("tune_*.yaml"))
AUTOSCALER = ROOT / "cluster" / "autoscaler" / "aws-gpu.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"


def test_the_product_job_configs_are_all_there():
    assert {p.stem for p in JOBS} >= {"digits_smoke", "fashion_mnist_resnet18", "imagenet_resnet50"}
    assert {p.stem for p in SEARCHES} >= {"tune_fashion_mnist"}


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: p.stem)
def test_every_search_config_validates(path):
    from raytrain_cls.core.config import Config
    from raytrain_cls.run.tune import load_search_file, parse_search, validate_search

    raw, search = load_search_file(str(path))
    base = Config().update(raw).validate()
    spec = validate_search(parse_search(search), base)
    assert spec.num_samples >= 1 and spec.space


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_every_job_config_loads_and_validates(path):
    cfg = load_config(str(path))
    assert cfg.model.model and cfg.sched.epochs >= 1


def test_job_configs_target_the_hardware_they_say():
    smoke = load_config(str(ROOT / "jobs" / "digits_smoke.yaml"))
    assert smoke.scaling.use_gpu is False and smoke.data.dataset == "digits"
    for gpu_job in ("fashion_mnist_resnet18", "fashion_mnist_fast", "imagenet_resnet50"):
        cfg = load_config(str(ROOT / "jobs" / f"{gpu_job}.yaml"))
        assert cfg.scaling.use_gpu is True and cfg.precision.amp and cfg.precision.amp_dtype == "bfloat16"
    imagenet = load_config(str(ROOT / "jobs" / "imagenet_resnet50.yaml"))
    # timm's rule: the recipe's lr is for its global batch of 128 x 8 GPUs.
    assert imagenet.data.batch_size * imagenet.scaling.num_workers == 1024


# ---- Ray autoscaler: the same validation `ray up` runs -------------------------------------------------------
def _autoscaler() -> dict:
    return yaml.safe_load(AUTOSCALER.read_text())


def _validate_autoscaler(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))  # fills provider defaults, then Ray's JSON schema


def test_autoscaler_yaml_passes_rays_schema():
    _validate_autoscaler(_autoscaler())


@pytest.mark.parametrize("breakage", ["unknown_key", "fractional_gpu", "no_provider"])
def test_the_schema_check_really_rejects_broken_configs(breakage):
    cfg = _autoscaler()
    if breakage == "unknown_key":
        cfg["head_node_typo"] = "head"
    elif breakage == "fractional_gpu":
        cfg["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    else:
        del cfg["provider"]
    # Ray's schema raises ValidationError; a config without a provider fails earlier, looking it up
    with pytest.raises((jsonschema.ValidationError, KeyError)):
        _validate_autoscaler(cfg)


def test_autoscaler_layout_matches_the_service():
    cfg = _autoscaler()
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no training on the head
    assert nodes["gpu"]["resources"]["GPU"] >= 1 and nodes["gpu"]["min_workers"] == 0
    assert ray.__version__ in cfg["docker"]["image"]
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][1]


# ---- KubeRay: the fields that decide whether the cluster works ------------------------------------------------
def _kuberay(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # rayStartParams values must be strings in KubeRay
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    for container in head["template"]["spec"]["containers"]:
        assert container["image"].startswith("rayproject/ray:" + ray.__version__)
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        assert all(c["image"].startswith("rayproject/ray:" + ray.__version__) for c in containers)
        assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers)
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_raycluster_manifest():
    doc = _kuberay("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_the_raycluster_head_tells_the_driver_what_the_autoscaler_can_add(monkeypatch):
    """KubeRay's autoscaler keeps its limits in the RayCluster; the driver reads them from the head's environment
    (capacity.py). They must be what the worker groups can really grow to."""
    from raytrain_cls.run import capacity

    spec = _kuberay("raycluster.yaml")["spec"]
    env = {
        e["name"]: e["value"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"] for e in c.get("env", [])
    }
    monkeypatch.setenv(capacity.LIMITS_ENV, env[capacity.LIMITS_ENV])
    most = {"GPU": 0, "CPU": 0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        most["GPU"] += group["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
        most["CPU"] += group["maxReplicas"] * int(limits["cpu"])
    assert capacity.env_limits() == most


def test_rayjob_manifest_runs_a_valid_raytrain_command():
    doc = _kuberay("rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "raytrain_cls", "train"]
    args = build_parser().parse_args(argv[3:])  # the entrypoint is a command our CLI accepts...
    cfg = load_config(args.config, overrides_of(args))  # ...with a config that validates
    assert cfg.checkpoint.output.startswith("s3://"), "multi-node runs need shared storage"
    assert int(spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]) >= cfg.scaling.num_workers
