"""A live autoscaler: a head with no CPUs and a node type of 1-CPU nodes, 0 to 2 of them, run by Ray's own fake
multi-node provider (the autoscaler starts each "node" as another raylet on this host). As on
cluster/autoscaler/aws-gpu.yaml, nothing a run needs is up when it is submitted: the driver must size it by what the
autoscaler can add (capacity.py reads the limits from the running autoscaler's config), and the run must then train
on the nodes the autoscaler starts for it. Each cluster is stopped by its own process ids only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from processes import pids_mentioning

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PORT = 6398  # and 6399 (the v1 cluster, up while the v2 one idles); their agents 100 above, Ray clients 200
HEAD_ID = "f" * 51 + "00000"  # the fake provider's id for the head (its FAKE_HEAD_NODE_ID)
HEAD_TYPE = "ray.head.default"  # the provider tags the head with this type name
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def cluster_config(ip: str, port: int) -> dict:
    """The autoscaler's cluster YAML. The provider is named as an "external" module: as "fake_multinode" the
    autoscaler wants that provider's example.yaml for defaults, which the Ray wheel does not ship."""
    return {
        "cluster_name": "raytrain-cls-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "gcs_address": f"{ip}:{port}",
            "head_node_id": HEAD_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": HEAD_TYPE,
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    def __init__(self, version: str, port: int):
        from ray._private.services import get_node_ip_address

        # A short path: Ray's socket paths under it must stay within AF_UNIX's 107 bytes (pytest's tmp_path does not)
        state = Path(tempfile.mkdtemp(prefix=f"rtc-as-{version}-", dir="/tmp"))
        self.state, self.version, self.port = state, version, port
        self.config = state / "autoscaler.yaml"
        self.config.write_text(yaml.safe_dump(cluster_config(get_node_ip_address(), port)))
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_enable_autoscaler_v2": "1" if version == "v2" else "0",
        }
        if version == "v2":  # the v2 autoscaler finds the head among the provider's instances by these
            env.update(RAY_CLOUD_INSTANCE_ID=HEAD_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=HEAD_ID)
        env.pop("RAY_ADDRESS", None)
        self.log = (state / "head.log").open("w")
        # --block: `ray start` stays the parent of the node's processes, the autoscaler and the raylets it starts
        # among them; start_new_session gives them one process group to end.
        self.head = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--block",
                "--port",
                str(port),
                "--num-cpus",
                "0",
                f"--autoscaling-config={self.config}",
                "--include-dashboard=false",
                "--dashboard-agent-listen-port",
                str(port + 100),
                "--ray-client-server-port",
                str(port + 200),
                "--disable-usage-stats",
                "--temp-dir",
                str(state / "ray"),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.wait_for_autoscaler()
        except BaseException:  # no test holds this cluster yet to stop it: do it here, then report why
            self.stop()
            raise

    def wait_for_autoscaler(self, timeout: float = 120):
        """Until the autoscaler's monitor process runs (it starts after the GCS and the raylet)."""
        deadline = time.monotonic() + timeout
        while not set(pids_mentioning(str(self.config).encode())) - {self.head.pid}:  # the monitor's is the other
            assert self.head.poll() is None, (self.state / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the autoscaler did not start"
            time.sleep(0.5)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{self.port}"}
        env.pop("RAYTRAIN_CLS_AUTOSCALER_LIMITS", None)
        return subprocess.run(
            [sys.executable, "-m", "raytrain_cls", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self):
        self.head.terminate()  # `ray start --block` takes its node down on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.head.pid, 9)  # what did not go with it: the raylets the autoscaler started
        self.head.wait()
        self.log.close()
        marker = str(self.state).encode()
        deadline = time.monotonic() + 30
        while pids_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_mentioning(marker), "the fake cluster's processes outlived it"
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def v2_cluster():
    cluster = FakeCluster("v2", PORT)
    yield cluster
    cluster.stop()


def test_a_run_larger_than_the_autoscaler_can_grow_to_is_refused_before_any_cluster_work(v2_cluster):
    proc = v2_cluster.run("train", "--epochs", "1", "--num-workers", "3", timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(
        rf"needs 3 CPUs .* but the Ray cluster has \d+ now and its autoscaler can add up to 2 in all "
        rf"\(limits from {re.escape(str(v2_cluster.config))}\)",
        proc.stderr,
    ), proc.stderr[-2000:]


def test_a_run_on_a_head_without_cpus_trains_on_the_nodes_the_autoscaler_adds(v2_cluster, tmp_path):
    """Before capacity.py read the running autoscaler's config, this run was refused: "needs 2 CPUs but the Ray
    cluster has 0"."""
    proc = v2_cluster.run(
        "train",
        "--epochs",
        "1",
        "--num-workers",
        "2",
        "--progress",
        "lines",
        "--output",
        str(tmp_path),
        "--experiment",
        "grown",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"the cluster's autoscaler (limits from {v2_cluster.config}) adds the nodes" in proc.stdout
    assert "2 training worker(s) on 2 node(s)" in out  # one per 1-CPU node: both were started for this run
    result = json.loads((tmp_path / "grown" / "result.json").read_text())
    assert result["best_value"] > 10  # digits, one epoch: better than chance


def test_a_v1_autoscalers_limits_are_read_the_same_way():
    cluster = FakeCluster("v1", PORT + 1)
    try:
        proc = cluster.run("train", "--epochs", "1", "--num-workers", "3", timeout=120)
    finally:
        cluster.stop()
    assert proc.returncode == 2 and f"can add up to 2 in all (limits from {cluster.config})" in proc.stderr, (
        proc.stderr[-2000:]
    )
