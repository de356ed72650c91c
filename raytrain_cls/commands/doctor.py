"""`raytrain-cls doctor`: check the environment a run needs and say what is wrong and how to fix it."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.storage import is_uri
from raytrain_cls.data import DataError, build_source
from raytrain_cls.run.capacity import LIMITS_ENV, autoscaler_limits
from raytrain_cls.run.checkpointer import resolve_output
from raytrain_cls.run.driver import check_reachable, probe_gcs, split_address

# What this release is tested with (pyproject's bounds); outside them, a warning, not a failure.
SUPPORTED = {
    "torch": ("2.11", "2.15"),
    "torchvision": ("0.26", "0.30"),
    "timm": ("1.0.29", "2"),
    "ray": ("2.60", "2.61"),
    "pyarrow": ("14", None),
    "safetensors": ("0.4", None),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # a problem that does not stop a run

    def line(self) -> str:
        tag = "ok  " if self.ok else ("warn" if self.warn else "FAIL")
        text = f"[{tag}] {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix and not self.ok else "")


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_versions() -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0], "use Python 3.10 or newer")]
    for pkg, (low, high) in SUPPORTED.items():
        try:
            v = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(pkg, False, "not installed", "pip install -e . (from the repository root)"))
            continue
        inside = _version_tuple(v) >= _version_tuple(low) and (high is None or _version_tuple(v) < _version_tuple(high))
        bounds = f">={low}" + (f",<{high}" if high else "")
        checks.append(Check(pkg, inside, f"{v} (tested {bounds})", f"pip install '{pkg}{bounds}'", warn=True))
    try:
        importlib.metadata.version("ray")
        import aiohttp  # noqa: F401
        import ray.dashboard  # noqa: F401  (ray[default]: job submission needs it)

        checks.append(Check("ray[default]", True, "dashboard and job server available"))
    except ImportError:
        checks.append(
            Check(
                "ray[default]",
                False,
                "missing: `ray job submit` needs it",
                "pip install 'ray[default,train,tune]==2.60.*'",
            )
        )
    return checks


def check_gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", True, f"{torch.cuda.device_count()} visible: {names}")
    return Check("gpu", True, "none visible: training runs on CPU workers (gloo)")


def token_source() -> Optional[str]:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).is_file() and Path(path).read_text().strip() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.read_text().strip() else None


def check_cluster() -> list[Check]:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return [Check("ray cluster", True, "RAY_ADDRESS unset: `train` starts a private local Ray")]

    checks = []
    try:
        check_reachable(address, timeout=5)
        accepted = probe_gcs(address)  # the token, asked of the cluster itself
        checks.append(Check("ray cluster", True, f"{address} reachable" + (", token accepted" if accepted else "")))
    except ConfigError as e:
        checks.append(
            Check(
                "ray cluster",
                False,
                f"RAY_ADDRESS={address}: {e.reason}",
                "" if "token" in e.reason else "start the cluster (cluster/local/start-head.sh) or fix RAY_ADDRESS",
            )
        )
    source = token_source()
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if source is None:
        checks.append(
            Check(
                "auth token",
                False,
                "no token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token are all unset or empty",
                "run `ray get-auth-token` on the head node and export RAY_AUTH_TOKEN=<token>",
            )
        )
    elif mode != "token":
        checks.append(
            Check(
                "auth token",
                False,
                f"found ({source}) but RAY_AUTH_MODE={mode or 'unset'}",
                "export RAY_AUTH_MODE=token",
                warn=True,
            )
        )
    else:
        checks.append(Check("auth token", True, f"from {source}"))
    return checks


def check_autoscaler() -> Optional[Check]:
    """What the driver will count on beyond the nodes that are up (capacity.py), read without connecting: the
    GCS's config needs a connection, so the environment variable and this host's autoscaler files speak here."""
    address = os.environ.get("RAY_ADDRESS", "")
    scheme, _, port = split_address(address)
    if not address or scheme.startswith("http") or not port.isdigit():
        return None  # a private local Ray, or a job server address: no GCS port to match an autoscaler by
    try:
        limits, source = autoscaler_limits(int(port))
    except ConfigError as e:
        return Check("autoscaler", False, e.reason, f"export {LIMITS_ENV}=GPU=4,CPU=32 (or unset it)")
    if not limits:
        return Check(
            "autoscaler",
            True,
            "no limits found on this host: runs are sized by the nodes that are up "
            f"(an autoscaler the driver cannot read, e.g. KubeRay's: set {LIMITS_ENV})",
        )
    shown = ", ".join(f"{k} {v:g}" for k, v in sorted(limits.items()) if k in ("CPU", "GPU") or v)
    return Check("autoscaler", True, f"can grow the cluster to {shown} (from {source})")


def check_storage(output: str) -> Check:
    target = resolve_output(output)
    probe = f".raytrain-cls-doctor-{uuid.uuid4().hex[:8]}"
    try:
        if is_uri(target):
            import pyarrow.fs

            fs, inner = pyarrow.fs.FileSystem.from_uri(target)
            fs.create_dir(inner, recursive=True)
            with fs.open_output_stream(f"{inner}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{inner}/{probe}")
        else:
            Path(target).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target, prefix=probe):
                pass
    except Exception as e:
        return Check(
            "storage",
            False,
            f"{target} is not writable ({type(e).__name__}: {e})",
            "pick another --output, or fix its permissions / credentials",
        )
    return Check("storage", True, f"{target} writable")


def check_data(cfg: Config) -> Check:
    try:
        cfg.validate()
        src = build_source(cfg)
    except (DataError, ValueError) as e:
        return Check("data", False, str(e), "fix --dataset/--data-dir (see the message)")
    return Check(
        "data",
        True,
        f"{cfg.data.dataset or 'folder'}: {len(src.train)} train / {len(src.val)} val images, "
        f"{src.num_classes} classes",
    )


def run_doctor(cfg: Config) -> list[Check]:
    autoscaler = check_autoscaler()
    return [
        *check_versions(),
        check_gpu(),
        *check_cluster(),
        *([autoscaler] if autoscaler else []),
        check_storage(cfg.checkpoint.output),
        check_data(cfg),
    ]
