"""Everything a run must carry across a restart, registered in one place and written as one checkpoint directory.

Layout of a checkpoint directory:
    model.safetensors   the bare model's weights (no pickle)
    ema.safetensors     the EMA weights, when EMA is on
    state.pt            optimizer, LR scheduler, grad scaler, counters, RNG states, sampler position, the
                        weights of trainable modules outside the model (a feature-distillation projection);
                        only tensors and plain Python values, loaded with torch.load(weights_only=True)
    meta.json           format version, the resolved config as a plain dict, epoch, metrics, best metric
Loading never falls back to unrestricted unpickling.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raytrain_cls.core.model import unwrap
from raytrain_cls.core.storage import join, read_text

FORMAT_VERSION = 2  # 2: per-rank RNG and loss sums, mid-epoch position
MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE = "model.safetensors", "ema.safetensors", "state.pt", "meta.json"
CHECKPOINT_PREFIX = "epoch-"  # checkpoint folders: epoch-0007, and epoch-0007-step-0000120 mid-epoch


class CheckpointError(RuntimeError):
    pass


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of floating-point weights/buffers holding NaN or Inf (one host sync for the whole model)."""
    items = [(n, t) for n, t in unwrap(module).state_dict().items() if t.is_floating_point() and t.numel()]
    if not items:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in items]).cpu()
    return [n for (n, _), ok in zip(items, flags.tolist()) if not ok]


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a state dict as safetensors; tensors that share storage are written once and re-linked on load."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in unwrap(module).state_dict().items():
        key = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if t.numel()
            else None
        )
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": "pt"})


def load_weights(module: torch.nn.Module, path: Path, strict: bool = True):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        tensors = load_file(str(path))
    except Exception as e:  # truncated, tampered or missing: name the file, never half-load
        raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return unwrap(module).load_state_dict(tensors, strict=strict)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(
        python=random.getstate(),
        torch=torch.get_rng_state(),
        numpy=dict(
            name=np_state[0],
            keys=torch.from_numpy(np_state[1].astype(np.int64)),
            pos=int(np_state[2]),
            has_gauss=int(np_state[3]),
            cached=float(np_state[4]),
        ),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainState:
    """The registry: model, EMA, optimizer, scheduler, scaler, counters, position in the epoch, per-rank RNG.

    One save(), one load(): anything a resumed run needs is an attribute here, so resume is complete by construction.
    ``in_epoch`` is set only for mid-epoch (recovery) checkpoints: where in the epoch's global sample order the run
    stood. ``rank_states`` holds, per rank, that rank's RNG states and its running loss sums for the epoch.
    """

    def __init__(
        self,
        config: dict,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[Any] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        ema: Optional[torch.nn.Module] = None,
        aux: Optional[torch.nn.Module] = None,
    ):
        self.config, self.model, self.optimizer = config, model, optimizer
        self.scheduler, self.scaler, self.ema, self.aux = scheduler, scaler, ema, aux
        self.epoch = -1  # last completed epoch
        self.num_updates = 0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.in_epoch: Optional[dict] = None  # {epoch, batches, samples, world_size, batch_size} mid-epoch only
        self.rank_states: Optional[list[dict]] = None  # [{rng, loss_sum, seen}] indexed by rank

    @property
    def start_epoch(self) -> int:
        return self.epoch + 1

    def _state(self) -> dict:
        ranks = self.rank_states if self.rank_states is not None else [dict(rng=rng_state(), loss_sum=0.0, seen=0)]
        return dict(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            counters=dict(epoch=self.epoch, num_updates=self.num_updates),
            best=dict(metric=self.best_metric, epoch=self.best_epoch),
            position=dict(self.in_epoch or {}),
            ranks=ranks,
            aux={k: v.detach().cpu() for k, v in self.aux.state_dict().items()} if self.aux is not None else None,
        )

    def save(self, directory: str | Path, metrics: Optional[dict] = None) -> Path:
        """Write the complete state into ``directory`` (a fresh temp dir: Ray only sees it once complete)."""
        bad = non_finite_tensors(self.model)
        if bad:  # a checkpoint is something to resume from: never one with NaN/Inf weights
            raise CheckpointError(f"refusing to checkpoint non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
            save_weights(self.model, d / MODEL_FILE)
            if self.ema is not None:
                save_weights(self.ema.module, d / EMA_FILE)
            torch.save(self._state(), d / STATE_FILE)
            meta = dict(
                format_version=FORMAT_VERSION,
                epoch=self.epoch,
                num_updates=self.num_updates,
                in_epoch=self.in_epoch,
                best_metric=self.best_metric,
                best_epoch=self.best_epoch,
                metrics=metrics or {},
                config=self.config,
            )
            (d / META_FILE).write_text(json.dumps(meta, indent=1))  # last: a directory without it is no checkpoint
        except OSError as e:  # e.g. ENOSPC: this directory is a fresh temp dir, earlier checkpoints are untouched
            raise CheckpointError(f"could not write the checkpoint ({e}); earlier checkpoints are untouched") from e
        return d

    def load(
        self, directory: str | Path, load_optimizer: bool = True, rank: int = 0, world_size: Optional[int] = None
    ) -> dict:
        """Restore everything from ``directory``. This rank's RNG states are restored when the checkpoint was written
        by as many ranks as there are now (or ``world_size`` is None); otherwise the caller re-seeds."""
        d = Path(directory)
        meta = read_meta(d)
        state = _load_state(d / STATE_FILE)  # checked first: a refused or broken state.pt changes nothing
        load_weights(self.model, d / MODEL_FILE)
        if self.ema is not None and (d / EMA_FILE).is_file():
            load_weights(self.ema.module, d / EMA_FILE)
        if self.aux is not None and state.get("aux"):
            self.aux.load_state_dict(state["aux"])
        if load_optimizer:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:  # e.g. a checkpoint of another model, or without the distillation projection
                raise CheckpointError(
                    f"{d}: its optimizer state does not fit this run's parameters ({e}); start "
                    "from its weights only with --no-resume-opt"
                ) from None
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.num_updates = state["counters"]["epoch"], state["counters"]["num_updates"]
        self.best_metric, self.best_epoch = state["best"]["metric"], state["best"]["epoch"]
        self.in_epoch = dict(state["position"]) or None
        self.rank_states = list(state["ranks"])
        if world_size is None or len(self.rank_states) == world_size:
            set_rng_state(self.rank_states[min(rank, len(self.rank_states) - 1)]["rng"])
        return meta


def read_meta(directory: str | Path) -> dict:
    """A checkpoint's meta.json, from a local directory or one under a URI, checked for our format version."""
    try:
        text = read_text(join(directory, META_FILE))
        if text is None:
            raise OSError("no such file")
        meta = json.loads(text)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory} is not a readable raytrain-cls checkpoint ({META_FILE}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: {META_FILE} is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}, the one this version reads"
        )
    return meta


STATE_KEYS = ("optimizer", "counters", "best", "position", "ranks")


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never fall back to unrestricted unpickling: that would run whatever the pickle says
        raise CheckpointError(f"refusing to load {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a raytrain-cls training state (missing {', '.join(missing)})")
    return state
