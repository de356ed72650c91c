"""Everything a run must carry across a restart, registered in one place and written as one checkpoint directory.

Layout of a checkpoint directory:
    model.safetensors   the bare model's weights (no pickle)
    ema.safetensors     the EMA weights, when EMA is on
    state.pt            optimizer, LR scheduler, grad scaler, counters, RNG states, sampler position, the
                        weights of trainable modules outside the model (a feature-distillation projection);
                        only tensors and plain Python values, loaded with torch.load(weights_only=True)
    meta.json           format version, the resolved config as a plain dict, epoch, metrics, best metric, and
                        the size and sha256 of every other file (written last: no meta.json, no checkpoint)
Loading verifies those checksums first and never falls back to unrestricted unpickling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raytrain_cls.core.errors import UserError
from raytrain_cls.core.storage import join, read_text

FORMAT_VERSION = 3  # 2: per-rank RNG and loss sums, mid-epoch position; 3: a checksum of every file
UNVERIFIED_VERSION = 2  # read still, without checksums to verify: written by the version before them
MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE = "model.safetensors", "ema.safetensors", "state.pt", "meta.json"
CHECKPOINT_PREFIX = "epoch-"  # checkpoint folders: epoch-0007, and epoch-0007-step-0000120 mid-epoch


class CheckpointError(UserError, RuntimeError):
    pass


log = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP (and torch.compile) wrappers: the one whose state a checkpoint holds."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def file_digest(path: Path) -> dict:
    """A file's size and sha256: what a checkpoint records of each of its files, as a shards manifest does."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(bytes=path.stat().st_size, sha256=digest)


def verify_files(directory: str | Path, meta: dict) -> None:
    """Every file meta.json lists is there, with its recorded size and sha256; else CheckpointError naming it.
    A bit flipped on disk or in transfer is refused here instead of loading as silently wrong weights."""
    if meta.get("format_version") == UNVERIFIED_VERSION:
        log.warning("%s: checkpoint format %d has no checksums: loaded unverified", directory, UNVERIFIED_VERSION)
        return
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or STATE_FILE not in files:
        raise CheckpointError(f"{directory}: {META_FILE} lists no checksums of {MODEL_FILE} and {STATE_FILE}")
    check_recorded_files(directory, files, "checkpoint", META_FILE, "; use another checkpoint of the run")


def check_recorded_files(directory: str | Path, files: dict, what: str, record: str, hint: str = "") -> None:
    """Each file ``record`` lists (name -> {bytes, sha256}) is a file directly in ``directory`` with that size and
    sha256; else CheckpointError naming it. Shared by checkpoints (meta.json) and exports (config.json)."""
    d = Path(directory)
    for name, recorded in sorted(files.items()):
        path = d / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{path}: missing from the {what} (its {record} lists it)")
        if not isinstance(recorded, dict) or file_digest(path) != recorded:
            raise CheckpointError(
                f"{path}: corrupt (its size or sha256 differs from the one recorded in {record} when it was "
                f"written){hint}"
            )


def verified_meta(directory: str | Path) -> dict:
    """A local checkpoint's meta.json, after every file it lists has been checked against its checksum."""
    meta = read_meta(directory)
    verify_files(directory, meta)
    return meta


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


def weights_header(path: Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """(shape of every tensor, aliases: name -> the tensor it shares storage with) of a weights file, from its
    header alone: nothing is loaded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)
    return {**shapes, **{name: shapes[target] for name, target in aliases.items()}}, aliases


def check_architecture(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """CheckpointError when the weights file does not fit the module: a checkpoint of another model or another
    class count. Works on a meta-device module, so the driver checks it before any worker builds the model."""
    try:
        shapes, _ = weights_header(path)
    except Exception as e:  # truncated, tampered or missing: name the file
        raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    expected = {name: tuple(t.shape) for name, t in unwrap(module).state_dict().items()}
    differ = sorted(n for n in expected.keys() & shapes.keys() if expected[n] != shapes[n])
    missing = sorted(expected.keys() - shapes.keys()) if strict else []
    unexpected = sorted(shapes.keys() - expected.keys()) if strict else []
    problems = []
    if differ:
        n = differ[0]
        problems.append(
            f"{len(differ)} tensor(s) of another shape (e.g. {n}: {list(shapes[n])} in the file, "
            f"{list(expected[n])} in the model)"
        )
    if missing:
        problems.append(f"{len(missing)} of the model's tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointError(
            f"{path} holds the weights of another architecture than this {type(unwrap(module)).__name__} "
            f"({'; '.join(problems)}): a checkpoint of another model, or trained with other model options"
        )


def load_weights(module: torch.nn.Module, path: Path, strict: bool = True):
    check_architecture(module, path, strict)  # a clear refusal instead of load_state_dict's size-mismatch dump
    try:
        _, aliases = weights_header(path)
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
            written = [MODEL_FILE, STATE_FILE] + ([EMA_FILE] if self.ema is not None else [])
            meta = dict(
                format_version=FORMAT_VERSION,
                files={name: file_digest(d / name) for name in written},
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
        meta = verified_meta(d)  # nothing is loaded from a checkpoint with a corrupt or missing file
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
    if meta.get("format_version") not in (FORMAT_VERSION, UNVERIFIED_VERSION):
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
