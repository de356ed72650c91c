"""What a Ray cluster can give a run: the resources it has now or, where an autoscaler can add nodes, the most it
can grow to.

The driver sizes a run (GPU or CPU workers, how many, whether Ray Data keeps a CPU) and refuses one that can never
be scheduled, before any cluster work. On an autoscaling cluster the GPU nodes are often not there yet: the
cluster launcher's aws-gpu.yaml keeps a CPU-only head and 0-4 GPU nodes that start when a job asks for GPUs.
Judged by ray.cluster_resources() alone, every GPU job there would be refused ("the Ray cluster has no GPUs").
So the limits of the autoscaler's node types count too, read where Ray keeps them:
- autoscaler v2 (KubeRay, and `ray up` with RAY_enable_autoscaler_v2=1) reports its cluster config to the GCS;
  Ray Train reads the same (ray._private.state.get_max_resources_from_cluster_config) for its own check;
- the cluster launcher (`ray up`, autoscaler v1) leaves the cluster YAML on the head as
  ~/ray_bootstrap_config.yaml, where Ray Tune looks for it too; a job's driver runs on the head.
A cluster without either has what it has.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
UNLIMITED = 2 ** 62  # Ray's "-1 = no limit" comes back as sys.maxsize


def gcs_limits() -> Optional[dict]:
    """The autoscaler v2 cluster config's maxima (None without one)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older Ray or no config: no autoscaler to count on
        return None


def bootstrap_limits(path: Path = BOOTSTRAP_CONFIG) -> Optional[dict]:
    """The cluster launcher's YAML: each node type's resources times its max_workers (the head type once), the
    cluster-wide max_workers capping each type. An upper bound; None without the file or any declared resources."""
    import yaml

    path = path.expanduser()
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return None
    cap = config.get("max_workers")
    limits: dict = {}
    for name, node_type in config["available_node_types"].items():
        node_type = node_type or {}
        if name == config.get("head_node_type"):
            count = 1
        else:
            count = node_type.get("max_workers", cap if cap is not None else 0)
            count = min(count, cap) if cap is not None else count
        for key, value in (node_type.get("resources") or {}).items():
            limits[key] = limits.get(key, 0) + value * count
    return limits or None


def cluster_capacity(current: dict, limits: Optional[dict] = None) -> dict:
    """Per resource, the larger of what the cluster has now and what its autoscaler can reach (math.inf for no
    limit). ``limits``: the autoscaler's maxima when already known ({} for none); else read as the module says."""
    if limits is None:
        limits = gcs_limits() or bootstrap_limits()
    capacity = dict(current)
    for key, value in (limits or {}).items():
        value = math.inf if value >= UNLIMITED else float(value)
        capacity[key] = max(float(capacity.get(key, 0)), value)
    return capacity
