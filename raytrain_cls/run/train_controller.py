"""What a run hands to Ray Train's controller process, kept free of torch: the callback that writes summary.csv, and
the torch backend's config.

Ray Train's controller unpickles everything it is handed (the backend config, the callbacks holding its backend)
as it starts, before it asks for the workers. Handed Ray's own ``TorchConfig``, whose module imports torch at its
top, the controller imported torch first and started the workers only then, though nothing in it needs torch until
the workers' process group is formed. ``DeferredTorchConfig`` carries the same settings in a module without torch:
the controller starts importing torch on a thread as it unpickles the backend, while the worker processes start,
and Ray's own torch backend (``TorchConfig().backend_cls``) does the work once the workers are up: the same
process-group set-up (gloo, NCCL), the same shutdown. On a running 2-core cluster the controller reached its
workers about 0.7 s sooner, and `train`'s command to first step went from a median 11.0 s to 10.6 s; deferring the
import without starting it early gained nothing (docs/benchmarks.md).

tests/unit/test_train_controller.py pins what this relies on (the TorchConfig fields, the backend's hooks and its
CUDA-device sharing) and that neither this module nor an unpickled config loads torch.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ray.train import UserCallback
from ray.train.backend import Backend, BackendConfig

from raytrain_cls.core.storage import join
from raytrain_cls.run.report import SUMMARY_FILE, record_epoch


class SummaryCallback(UserCallback):
    """Appends (or replaces) one summary.csv row per reported epoch; runs in Ray Train's controller."""

    def __init__(self, run_dir: str):
        self.path = join(run_dir, SUMMARY_FILE)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            record_epoch(self.path, metrics[0])  # rank 0's metrics; evaluation is already reduced across ranks


@dataclass
class DeferredTorchConfig(BackendConfig):
    """Ray's ``TorchConfig`` (same fields, same meaning), without importing torch where it is unpickled."""

    backend: Optional[str] = None  # None: TorchTrainer picks nccl with GPUs, gloo without
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return DeferredTorchBackend

    @property
    def train_func_context(self):
        return _torch_config().train_func_context  # used on the driver, which has torch anyway

    @property
    def framework(self):
        return _torch_config().framework

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_torch_config(self):
        from ray.train.torch import TorchConfig

        return TorchConfig(**asdict(self))


class DeferredTorchBackend(Backend):
    """Ray's torch backend, imported when the workers are up; its import starts as the controller gets this."""

    share_cuda_visible_devices = True  # as Ray's torch backend: the workers of a node see each other's GPUs

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        _import_torch_backend_in_background()

    def on_start(self, worker_group, backend_config: DeferredTorchConfig) -> None:
        config = backend_config.as_torch_config()
        config.backend_cls().on_start(worker_group, config)

    def on_training_start(self, worker_group, backend_config: DeferredTorchConfig) -> None:
        config = backend_config.as_torch_config()
        config.backend_cls().on_training_start(worker_group, config)

    def on_shutdown(self, worker_group, backend_config: DeferredTorchConfig) -> None:
        config = backend_config.as_torch_config()
        config.backend_cls().on_shutdown(worker_group, config)


def _torch_config():
    from ray.train.torch import TorchConfig

    return TorchConfig()


_background_import_lock = threading.Lock()
_background_import: Optional[threading.Thread] = None


def _import_torch_backend_in_background() -> None:
    """Once per process: import Ray's torch backend (torch) on a thread, so that it is loaded by the time the
    workers are up. Python's import lock makes an import that comes first wait for it, never run twice."""
    global _background_import
    with _background_import_lock:
        if _background_import is None:
            _background_import = threading.Thread(target=_torch_config, name="import-torch-backend", daemon=True)
            _background_import.start()
