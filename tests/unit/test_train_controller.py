"""train_controller: what a run hands Ray Train's controller loads no torch until the workers are up, and the
deferred torch backend is Ray's own in everything else. The pins fail when a Ray upgrade changes TorchConfig or the
backend protocol, so that run/train_controller.py is looked at again. No Ray runs."""

import dataclasses
import subprocess
import sys
import textwrap

import cloudpickle
import ray.train
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from raytrain_cls.run.ray_trainer import RunTrainer
from raytrain_cls.run.train_controller import DeferredTorchBackend, DeferredTorchConfig, SummaryCallback


def _noop(config):
    pass


def _trainer(tmp_path, use_gpu=False) -> RunTrainer:
    return RunTrainer(
        _noop,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), callbacks=[SummaryCallback(str(tmp_path))]),
    )


def test_the_deferred_config_has_torch_configs_fields_and_defaults():
    def fields(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}

    assert fields(DeferredTorchConfig) == fields(TorchConfig)
    config = DeferredTorchConfig(backend="gloo", timeout_s=60)
    assert config.as_torch_config() == TorchConfig(backend="gloo", timeout_s=60)
    assert config.to_dict() == TorchConfig(backend="gloo", timeout_s=60).to_dict()
    assert config.framework == TorchConfig().framework
    assert config.train_func_context is TorchConfig().train_func_context


def test_the_deferred_backend_covers_every_hook_of_rays_torch_backend():
    torch_backend = TorchConfig().backend_cls
    hooks = {name for name in dir(Backend) if name.startswith("on_")}
    assert hooks and hooks == {"on_start", "on_training_start", "on_shutdown"}  # a new hook: delegate it too
    for hook in hooks:
        assert hook in vars(DeferredTorchBackend), hook
    assert DeferredTorchBackend.share_cuda_visible_devices == torch_backend.share_cuda_visible_devices


def test_a_run_trainer_hands_the_deferred_config_and_torch_trainer_still_picks_the_process_group_backend(tmp_path):
    assert isinstance(_trainer(tmp_path).backend_config, DeferredTorchConfig)
    assert _trainer(tmp_path).backend_config.backend == "gloo"
    assert _trainer(tmp_path, use_gpu=True).backend_config.backend == "nccl"
    backends = [cb._backend for cb in _trainer(tmp_path)._create_default_callbacks() if hasattr(cb, "_backend")]
    assert len(backends) == 2 and all(isinstance(b, DeferredTorchBackend) for b in backends)  # accelerators, setup


def test_what_the_controller_unpickles_loads_no_torch_until_the_background_import(tmp_path):
    trainer = _trainer(tmp_path)
    payload = cloudpickle.dumps(
        dict(
            callbacks=trainer._create_default_callbacks(),
            run_config=trainer.run_config,
            backend_config=trainer.backend_config,
        )
    )
    assert b"ray.train.torch" not in payload
    code = textwrap.dedent(
        """
        import pickle, sys, threading
        import raytrain_cls.run.train_controller as tc
        assert "torch" not in sys.modules, "the module"
        started = []
        tc._import_torch_backend_in_background = lambda: started.append(1)
        pickle.loads(sys.stdin.buffer.read())
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
        assert started, "unpickling the backend did not start the torch import"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_the_background_import_runs_once_per_process_and_loads_rays_torch_backend():
    code = textwrap.dedent(
        """
        import pickle, sys, threading
        import raytrain_cls.run.train_controller as tc
        pickle.loads(pickle.dumps(tc.DeferredTorchBackend()))
        pickle.loads(pickle.dumps(tc.DeferredTorchBackend()))
        imports = [t for t in threading.enumerate() if t.name == "import-torch-backend"]
        assert len(imports) <= 1, imports
        tc._background_import.join(120)
        assert "ray.train.torch.config" in sys.modules and "torch" in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
