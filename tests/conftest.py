"""Shared test set-up. Unit tests (tests/unit) never start Ray; integration tests share one private local Ray."""

import os
from pathlib import Path

import pytest

# Explicit, so a test never depends on what a previous `ray.init()` on this host left in ~/.ray: token auth stays
# on as in production (Ray 2.60's default for new local clusters).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controller polls workers every 2 s; a worker that dies inside that window can lose the checkpoint it
# just reported. Poll faster so fault tests do not depend on luck.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Never attach to a cluster someone else started on this host.
os.environ.pop("RAY_ADDRESS", None)

# s3:// tests talk to a local moto S3 server; Ray workers inherit these from the process that starts Ray, so they
# are set before any cluster exists. setdefault: real credentials of a developer stay untouched (moto takes any).
for _key, _value in (
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
):
    os.environ.setdefault(_key, _value)

# --log-wandb runs in tests write W&B's records locally (no account, no network); Ray workers inherit this too.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# CPU bf16 tests must not hit oneDNN's AMX bf16 kernel, which can read NaN bit patterns past a matrix's end and leak
# them into clean rows (raytrain_cls/onednn.py): on AMX Xeons test_bf16_autocast_path saw a NaN evaluation now and
# then, never when run alone. The product sets this for its bf16 CPU workers; the test process and the Ray workers
# it starts take it from here, before torch runs its first oneDNN kernel.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

RAY_CPUS = 2


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray cluster with 2 CPUs for all integration tests (start-up costs ~5 s).

    Without the dashboard, as on the GPU images and on any cluster installed without ray[default]: there Ray
    Train's own clean-up never frees the workers of a trial Tune stops early, so the ASHA tests prove that the
    search driver's does (tune._stopped_trial_cleaner). The end-to-end tests run clusters with the dashboard."""
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_processes(ray_local):
    """processes(title) -> pids of the shared Ray's processes titled `title` (Ray names an actor's process
    ray::<Class>): children of this session's raylet only, never another cluster's on the same host."""
    session = ray_local._private.worker.global_worker.node.session_name.encode()

    def processes(title: str) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if not (entry / "cmdline").read_bytes().startswith(title.encode()):
                        continue
                    ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                    if session in Path(f"/proc/{ppid}/cmdline").read_bytes():
                        pids.append(int(entry.name))
                except (OSError, IndexError):
                    pass
        return pids

    return processes


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 API (moto) for the whole session: returns "host:port" for ?endpoint_override=...&scheme=http."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_upload(s3_endpoint):
    """upload(local_dir, prefix) -> the s3:// URI (with the endpoint query) of a copy in the moto bucket."""
    from pyarrow import fs

    query = f"endpoint_override={s3_endpoint}&scheme=http"
    s3, _ = fs.FileSystem.from_uri(f"s3://data?{query}&allow_bucket_creation=true")
    s3.create_dir("data")

    def upload(local_dir, prefix: str) -> str:
        fs.copy_files(
            str(local_dir), f"data/{prefix}", source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3
        )
        return f"s3://data/{prefix}?{query}"

    return upload
