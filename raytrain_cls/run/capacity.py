"""What a Ray cluster can give a run: the resources it has now or, where an autoscaler can add nodes, the most it
can grow to.

The driver sizes a run (GPU or CPU workers, how many, whether Ray Data keeps a CPU) and refuses one that can never
be scheduled, before any cluster work. On an autoscaling cluster the GPU nodes are often not there yet: the
cluster launcher's aws-gpu.yaml keeps a CPU-only head and 0-4 GPU nodes that start when a job asks for GPUs.
Judged by ray.cluster_resources() alone, every GPU job there would be refused ("the Ray cluster has no GPUs").

So the limits of the autoscaler's node types count too, read from the first place that has them:
- RAYTRAIN_CLS_AUTOSCALER_LIMITS in the driver's environment ("GPU=4,CPU=32"): for clusters whose autoscaler
  keeps its config where the driver cannot read it. KubeRay's reads the RayCluster from Kubernetes, so
  cluster/kuberay/raycluster.yaml sets this on the head, whose environment every `ray job submit` driver has;
- the cluster config an autoscaler reports to the GCS, which Ray Train reads for its own check
  (ray._private.state.get_max_resources_from_cluster_config). Ray 2.60's autoscalers report none (seen on live
  v1 and v2 autoscalers); later Ray versions do;
- the config file the running autoscaler reads (its monitor process's --autoscaling-config), found on this host:
  `ray up` (~/ray_bootstrap_config.yaml) and any `ray start --head --autoscaling-config=FILE`, with a driver on
  the head, where `ray job submit` runs it;
- ~/ray_bootstrap_config.yaml, where the cluster launcher leaves the cluster YAML and Ray Tune looks too.
A cluster without any of these has what it has. Ray's state in the GCS cannot tell a real autoscaler from the
read-only one every plain `ray start --head` runs, so nothing is guessed from it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Optional

from raytrain_cls.core.config import ConfigError

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
UNLIMITED = 2**62  # Ray's "-1 = no limit" comes back as sys.maxsize
PROC = Path("/proc")
LIMITS_ENV = "RAYTRAIN_CLS_AUTOSCALER_LIMITS"
UNREAD_LIMITS_HINT = (
    f"an autoscaler whose limits the driver cannot read, as under KubeRay, is told by "
    f"{LIMITS_ENV}=GPU=N,CPU=M where the driver runs"
)


class Capacity(dict):
    """Resource name -> amount a run can count on (math.inf: an autoscaler without a limit); ``now``: what is up,
    ``limits_from``: where the autoscaler's limits were read (None: no autoscaler counted)."""

    def __init__(
        self,
        resources: dict,
        limits_from: Optional[str] = None,
        node_cpus: Optional[list] = None,
        holder: str = "the Ray cluster",
    ):
        super().__init__(resources)
        self.now = dict(resources)
        self.limits_from = limits_from
        self.node_cpus = node_cpus  # each live node's CPUs (the default CPU layout fills a node), None: unknown
        self.holder = holder  # whose resources these are, as a refusal names it


# ---- its limits ----------------------------------------------------------------------------------------------
def env_limits() -> Optional[dict]:
    """RAYTRAIN_CLS_AUTOSCALER_LIMITS ("GPU=4,CPU=32"; -1 = no limit), None when unset."""
    text = os.environ.get(LIMITS_ENV, "").strip()
    if not text:
        return None
    limits = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -2
        if not key.strip() or amount < -1:
            raise ConfigError(
                f"environment {LIMITS_ENV}",
                text,
                "expected RESOURCE=AMOUNT pairs separated by commas, e.g. GPU=4,CPU=32 (-1 = no limit)",
            )
        limits[key.strip()] = UNLIMITED if amount == -1 else amount
    return limits


def gcs_limits() -> Optional[dict]:
    """The maxima of the cluster config an autoscaler reported to the GCS (None without one)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older Ray or no config: no autoscaler to count on
        return None


def monitor_config(gcs_port: int, proc: Path = PROC) -> Optional[Path]:
    """The --autoscaling-config file of the autoscaler (monitor.py, v1 or v2) serving the GCS on ``gcs_port``,
    when it runs on this host; None otherwise."""
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or not ours to read
            continue
        if not any(re.search(r"ray/autoscaler/(v2/|_private/)?monitor\.py$", a) for a in args):
            continue
        values = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        address, config = values.get("gcs-address", ""), values.get("autoscaling-config")
        if config and address.rpartition(":")[2] == str(gcs_port):
            path = Path(config).expanduser()
            if not path.is_absolute():  # relative to where `ray start` ran, which the monitor inherited
                with contextlib.suppress(OSError):
                    path = Path(os.readlink(entry / "cwd")) / path
            return path
    return None


def config_limits(path: Path) -> Optional[dict]:
    """An autoscaler cluster YAML (the cluster launcher's format): each node type's resources times its
    max_workers (the head type once), the cluster-wide max_workers capping each type. An upper bound; None
    without the file or any declared resources."""
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


def autoscaler_limits(gcs_port: int) -> tuple[Optional[dict], Optional[str]]:
    """(limits, where they were read) from the first source that has them (module docstring); (None, None)."""
    for limits, source in ((env_limits, f"${LIMITS_ENV}"), (gcs_limits, "the cluster config in the GCS")):
        found = limits()
        if found:
            return found, source
    for path in (monitor_config(gcs_port), BOOTSTRAP_CONFIG.expanduser()):
        found = config_limits(path) if path else None
        if found:
            return found, str(path)
    return None, None


# ---- together ------------------------------------------------------------------------------------------------
def cluster_capacity(current: dict, limits: Optional[dict] = None, limits_from: Optional[str] = None) -> Capacity:
    """Per resource, the larger of what the cluster has now and what its autoscaler can reach (math.inf for no
    limit)."""
    capacity = Capacity(current, (limits_from or "the given limits") if limits else None)
    for key, value in (limits or {}).items():
        value = math.inf if value >= UNLIMITED else float(value)
        capacity[key] = max(float(capacity.get(key, 0)), value)
    return capacity


def connected_capacity() -> Capacity:
    """The capacity of the cluster this driver is connected to (after ray.init)."""
    import ray

    port = int(ray.get_runtime_context().gcs_address.rpartition(":")[2])
    capacity = cluster_capacity(ray.cluster_resources(), *autoscaler_limits(port))
    capacity.node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    return capacity


def local_capacity() -> Capacity:
    """What a local-mode run (--num-workers 0) trains on: this machine, as one node with the CPUs this process may
    run on and the CUDA devices torch sees (counted without initialising CUDA)."""
    import torch

    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return Capacity({"CPU": cpus, "GPU": float(torch.cuda.device_count())}, node_cpus=[cpus], holder="this machine")


def has(capacity: dict, key: str) -> str:
    """'the Ray cluster has N KEY', with what its autoscaler can add where that counts."""
    now, most = getattr(capacity, "now", capacity).get(key, 0), capacity.get(key, 0)
    holder = getattr(capacity, "holder", "the Ray cluster")
    if most == now:
        return f"{holder} has {now:g}"
    return (
        f"{holder} has {now:g} now and its autoscaler can add up to {most:g} in all "
        f"(limits from {capacity.limits_from})"
    )


def waiting_note(capacity: dict, needs: dict) -> Optional[str]:
    """A line for the start of a run that needs more than is up, so waits on the autoscaler; None otherwise."""
    now = getattr(capacity, "now", capacity)
    short = {k: v for k, v in needs.items() if v > now.get(k, 0)}
    if not short or not getattr(capacity, "limits_from", None):
        return None
    wanted = ", ".join(f"{v:g} {k} ({now.get(k, 0):g} up)" for k, v in short.items())
    return (
        f"The run needs {wanted}: the cluster's autoscaler (limits from {capacity.limits_from}) adds the nodes, "
        "and the workers start when they are up (Ray Train asks again every minute until then)"
    )
