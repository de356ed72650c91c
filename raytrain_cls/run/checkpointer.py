"""The checkpoint lifecycle in one place: how checkpoints are named, reported (every rank's part gathered, rank 0
writing), restored in a worker, found again by --resume, and cleaned up when Ray never registered them.

A checkpoint's contents (model, EMA, optimizer, scaler, scheduler, counters, RNG states, position in the epoch)
are core.state.TrainState's; this module decides when and where one is written and which one a run continues from.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Protocol

from raytrain_cls.core.config import Config, ConfigError, read_yaml
from raytrain_cls.core.state import (
    CHECKPOINT_PREFIX,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    TrainState,
    load_weights,
    read_meta,
    rng_state,
    verified_meta,
)
from raytrain_cls.core.storage import absolute, exists, is_uri, join, local_dir
from raytrain_cls.run.report import (
    CONFIG_FILE,
    PLACEMENT_GROUP_METRIC,
    SUMMARY_FILE,
    record_epoch,
    result_payload,
    sizes_per_epoch,
    write_result,
)
from raytrain_cls.run.startup import breakdown

DEFAULT_OUTPUT = "output/train"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it into a run directory it has started


CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)(?:-step-(\d+))?")


def checkpoint_name(epoch: int, num_updates: Optional[int] = None) -> str:
    """epoch-NNNN for the checkpoint at an epoch's end; epoch-NNNN-step-NNNNNNN for a mid-epoch recovery one."""
    name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
    return name if num_updates is None else f"{name}-step-{num_updates:07d}"


def resolve_output(output: str) -> str:
    """--output as Ray's storage_path: a URI as given, a local path made absolute (default ./output/train)."""
    output = output or DEFAULT_OUTPUT
    return absolute(output)


def run_config_file(run_dir: str) -> Optional[str]:
    """The config.yaml of an existing run, to continue it with the same settings."""
    path = join(run_dir, CONFIG_FILE)
    return path if exists(path) else None


# ---- in the workers ------------------------------------------------------------------------------------------
def placement_group_id() -> Optional[str]:
    """The hex id of the placement group Ray Train scheduled this worker group into."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    return group.id.hex() if group is not None else None


def report(
    state: TrainState,
    metrics: dict,
    rank: int,
    world: int,
    name: str,
    loss_sum: float = 0.0,
    seen: float = 0.0,
    keeper: Optional[CheckpointKeeper] = None,
) -> None:
    """Every rank reports (it is a barrier); rank 0 alone writes the checkpoint. Each rank's RNG states and running
    loss sums are gathered into it first. ``keeper``: who registers and keeps it (default: Ray Train)."""
    import torch.distributed as dist

    mine = dict(rng=rng_state(), loss_sum=float(loss_sum), seen=float(seen))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    state.rank_states = gathered
    (keeper or RayTrainCheckpoints()).report(state, metrics, rank, name)


def restore(
    state: TrainState, cfg: Config, rank: int, world: int, say=print, keeper: Optional[CheckpointKeeper] = None
) -> tuple[Optional[str], bool]:
    """Load the run's own latest checkpoint (a restarted worker group, a resumed run), else the checkpoint given
    with --resume CHECKPOINT (a new run started from it). Returns what was loaded (None for a fresh start) and
    whether it was the run's own checkpoint.

    The run's own latest is the keeper's latest registered checkpoint, or on a local run directory a complete newer
    one that it never registered: written by a worker group that died within Ray's poll interval of reporting it,
    or the checkpoint an elastic resize waited for (run/elastic.py). Those are registered now, in order, with their
    metrics, so that Ray's checkpoint list, summary.csv and a Tune search miss none of them. Rank 0 decides
    what is loaded, for every rank."""
    keeper = keeper or RayTrainCheckpoints()
    checkpoint = keeper.registered()
    run_dir = cfg.resolved.run_dir
    missed = []
    if run_dir and not is_uri(run_dir):
        after = Path(checkpoint.path).name if checkpoint is not None else None
        missed = from_rank_zero(rank, world, lambda: [str(p) for p in unregistered_since(run_dir, after)])
    if missed:
        state.load(missed[-1], load_optimizer=True, rank=rank, world_size=world)
        keeper.register_again(missed, rank, resumed_from=state.num_updates)
        return missed[-1], True
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state.load(d, load_optimizer=True, rank=rank, world_size=world)
        return checkpoint.path, True
    init = cfg.resolved.init_checkpoint
    if init:
        with local_dir(init) as d:  # one under a URI (s3://) is downloaded first
            state.load(d, load_optimizer=not cfg.checkpoint.no_resume_opt, rank=rank, world_size=world)
        return init, False
    weights = cfg.checkpoint.initial_checkpoint
    if weights:  # weights only: the run itself starts at epoch 0 (so this is not a "resume")
        with local_dir(weights) as path:  # a checkpoint directory under a URI is fetched first
            if path.is_dir():
                verified_meta(path)
            load_weights(state.model, path / MODEL_FILE if path.is_dir() else path)
        if state.ema is not None:
            state.ema.set(state.model)
        if rank == 0:
            say(f"Initial weights from {weights}")
    return None, False


def from_rank_zero(rank: int, world: int, decide):
    """Rank 0's ``decide()``, on every rank (a collective: every rank calls it at the same point). For what only
    rank 0 may ask, or what could differ between two ranks' looks (files being written)."""
    box = [decide() if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    return box[0]


STAGING_PREFIX = "raytrain-cls-ckpt-"  # + host + writer's pid: whose staging dir it is


def staging_dir() -> tempfile.TemporaryDirectory:
    """A fresh temp dir for rank 0 to write a checkpoint into before Ray copies it to the run directory, named by
    its host and writer's pid. Staging dirs on this host whose writer has died are removed first: a worker killed
    before Ray took its checkpoint (waiting for the other ranks, or in the copy) never cleans its own up, and each
    is a whole checkpoint's size."""
    remove_orphaned_staging()
    prefix = f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    return tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)  # Ray may have deleted it


def staging_dirs(root: Optional[str] = None) -> dict[Path, Optional[int]]:
    """This host's staging dirs under ``root`` (the temp dir), each with its writer's pid (None: not parsed)."""
    host = socket.gethostname()
    found = {}
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{glob.escape(host)}-*"):
        writer = folder.name[len(STAGING_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if folder.is_dir():
            found[folder] = int(writer) if writer.isdigit() else None
    return found


def remove_orphaned_staging(root: Optional[str] = None) -> list[Path]:
    """Remove the staging dirs under ``root`` (the temp dir) of this host's writers that no longer run; a dir
    another host wrote, or one whose name does not parse, is left alone. Returns what it removed."""
    removed = []
    for folder, writer in staging_dirs(root).items():
        if writer is not None and not _process_runs(writer):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True


class CheckpointKeeper(Protocol):
    """Who registers a run's checkpoints, decides which are kept and hands the latest back on a restart."""

    def registered(self) -> Any:
        """The latest checkpoint it registered (a ray.train.Checkpoint), or None."""

    def report(self, state: TrainState, metrics: dict, rank: int, name: str) -> None:
        """Every rank's report of ``metrics``; rank 0's with the checkpoint of ``state`` named ``name``."""

    def register_again(self, folders: list[str], rank: int, resumed_from: int) -> None:
        """Checkpoints already written to the run directory that it has not registered yet."""


class RayTrainCheckpoints:
    """Ray Train registers and keeps the checkpoints (its CheckpointConfig), and restores a restarted worker group
    from them: every `train` run and every Tune trial that is a Ray Train run."""

    def registered(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, state: TrainState, metrics: dict, rank: int, name: str) -> None:
        """Rank 0 writes the checkpoint, complete, into a staging dir and only then hands it to Ray, which copies it
        into the run directory and deletes the staging dir before it waits for the controller to take the report:
        a worker killed in that wait (a trial that Tune stops, a group torn down after a failure) leaves nothing
        behind. The other ranks report the metrics only (a barrier)."""
        import ray.train

        if rank != 0:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        with staging_dir() as tmp:
            state.save(tmp, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            metrics = dict(metrics, **{PLACEMENT_GROUP_METRIC: placement_group_id()})  # for Ray only
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=name, delete_local_checkpoint_after_upload=True
            )

    def register_again(self, folders: list[str], rank: int, resumed_from: int) -> None:
        """Report checkpoints already in the run directory to Ray, as written (no copy), with the metrics their
        meta.json kept, as reports of this worker group (which resumed at update ``resumed_from``); every rank
        reports (it is a barrier), rank 0 with the checkpoint."""
        import ray.train

        for folder in folders:
            metrics = dict(read_meta(folder).get("metrics") or {}, resumed_from=resumed_from)
            checkpoint = None
            if rank == 0:
                checkpoint = ray.train.Checkpoint(folder)
                metrics[PLACEMENT_GROUP_METRIC] = placement_group_id()  # this group's, as report() adds it
            in_place = ray.train.CheckpointUploadMode.NO_UPLOAD  # it is in the run directory already
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=in_place)


class RunDirCheckpoints:
    """The checkpoints of a run whose only worker trains in the process that asked for the run, where no Ray Train
    run keeps them: a Tune trial's own process (`tune --in-process`) or the command's (local mode, `train
    --num-workers 0`). Written straight into the local run directory (complete under a hidden name, then renamed),
    kept by Ray Train's rule (the --checkpoint-hist best by the eval metric, and the latest), with summary.csv's row
    and result.json for each evaluated epoch, then (``tell``: Tune's report) told to whoever listens. The run
    directory is the record: a resumed run continues from its newest complete checkpoint there (restore)."""

    def __init__(self, run_dir: str, cfg: Config, tell: Optional[Callable[[dict], None]] = None):
        self.run_dir = Path(run_dir)
        self.keep = cfg.checkpoint.checkpoint_hist
        self.metric = f"eval_{cfg.checkpoint.eval_metric}"
        self.mode = cfg.checkpoint.score_mode
        self.tell = tell  # ray.tune.report in a Tune trial; None in a local run, whose console has said it all

    @property
    def latest(self) -> Optional[Path]:
        """The newest checkpoint in the run directory: the one the trial wrote last, or the one it resumed from."""
        ranked = _ranked(self.run_dir, None)
        return ranked[-1][1] if ranked else None

    def registered(self):
        return None  # restore() finds the run directory's newest complete checkpoint instead

    def report(self, state: TrainState, metrics: dict, rank: int, name: str) -> None:
        final = self.run_dir / name
        partial = self.run_dir / f".{name}.partial"  # not an epoch-* name: never taken for a checkpoint
        shutil.rmtree(partial, ignore_errors=True)  # a partial one a killed trial left
        state.save(partial, metrics)
        if final.exists():
            shutil.rmtree(final)  # the same epoch trained again after a restart: the new one replaces it
        partial.rename(final)
        kept = self.prune()
        if metrics.get("recovery"):
            return  # one Tune iteration per epoch, as the Ray Train path reports
        record_epoch(join(str(self.run_dir), SUMMARY_FILE), metrics)
        # Before Tune hears of the epoch: Tune may end the trial's thread inside that report (its last epoch, or
        # ASHA stopping it), and result.json is what a resumed search reads to skip a finished trial.
        write_result(self.run_dir, self.result(metrics, kept))
        if self.tell is not None:
            self.tell(dict(metrics, checkpoint_path=str(final)))

    def register_again(self, folders: list[str], rank: int, resumed_from: int) -> None:
        pass  # already in the run directory, which is all the registry there is

    def kept(self) -> list[tuple[str, dict]]:
        """Each checkpoint in the run directory, oldest first, with the metrics it was reported with."""
        return [(str(folder), read_meta(folder).get("metrics") or {}) for _, folder in _ranked(self.run_dir, None)]

    def prune(self) -> list[tuple[str, dict]]:
        """Deletes all but the latest and the --checkpoint-hist best by the eval metric (ties: the later one);
        returns those it kept, oldest first, with their metrics."""
        kept = self.kept()
        sign = -1 if self.mode == "min" else 1

        def score(item: tuple[str, dict]) -> tuple[float, int]:
            value = item[1].get(self.metric)
            return (sign * value if isinstance(value, (int, float)) else -math.inf, item[1].get("epoch", -1))

        best = {path for path, _ in sorted(kept, key=score, reverse=True)[: self.keep]}
        latest = kept[-1][0] if kept else None
        for path, _ in kept:
            if path not in best and path != latest:
                shutil.rmtree(path)
        return [(path, metrics) for path, metrics in kept if path in best or path == latest]

    def result(self, last: dict, kept: list[tuple[str, dict]]) -> dict:
        """result.json for the trial after the epoch that reported ``last``, as a Ray Train run writes it, with the
        checkpoints ``kept`` (prune's)."""
        latest = kept[-1][0] if kept else None
        payload = result_payload(last, latest, kept, self.metric, self.mode, str(self.run_dir))
        payload["epochs"] = sizes_per_epoch(str(self.run_dir))
        payload["startup"] = breakdown(last.get("startup") or {})
        return payload


def progress_key(name: str) -> Optional[tuple[int, int, int]]:
    """Where a checkpoint named by checkpoint_name stands in its run: (epoch, 0 mid-epoch / 1 at its end, update);
    None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(name)
    if match is None:
        return None
    epoch, step = int(match.group(1)), match.group(2)
    return (epoch, 0, int(step)) if step is not None else (epoch, 1, 0)


def _ranked(run_dir: str | Path, after: Optional[str]) -> list[tuple[tuple, Path]]:
    """The run directory's checkpoint folders beyond the one named ``after``, by progress, oldest first."""
    floor = progress_key(after) if after else None
    ranked = []
    for folder in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        key = progress_key(folder.name)
        if key is not None and (floor is None or key > floor):
            ranked.append((key, folder))
    return sorted(ranked)


def _complete(folder: Path) -> bool:
    """Every file its meta.json lists is there with its recorded checksum (format 2, without them, never is)."""
    try:
        return bool(verified_meta(folder).get("files"))
    except CheckpointError:
        return False  # still being copied in, or damaged


def newest_written(run_dir: str | Path, after: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint folder of a local run directory beyond the one named ``after``, or None.
    Checks from the newest back, so only as many folders as needed are hashed."""
    return next((folder for _, folder in reversed(_ranked(run_dir, after)) if _complete(folder)), None)


def unregistered_since(run_dir: str | Path, registered: Optional[str]) -> list[Path]:
    """The complete checkpoint folders beyond the one Ray registered last (``registered``, None: none), oldest
    first, up to the newest complete one."""
    return [folder for _, folder in _ranked(run_dir, registered) if _complete(folder)]


# ---- on the driver -------------------------------------------------------------------------------------------
def run_started(run_dir: str) -> bool:
    """Ray Train has registered a checkpoint of this run (its snapshot is there), on a local path or a URI."""
    return exists(join(run_dir, RAY_SNAPSHOT))


def find_resume_target(resume: str, output: str) -> tuple[str, str]:
    """What --resume names: ("run", run_dir) to continue a run, or ("checkpoint", dir) to start from one. A path
    or URI as given, else a name under --output; local paths and cloud URIs alike."""
    given = absolute(resume)
    candidates = [given] if is_uri(resume) or Path(resume).is_absolute() else [given, join(output, resume)]
    for candidate in candidates:
        if exists(join(candidate, RAY_SNAPSHOT)):
            return "run", candidate
        if exists(join(candidate, META_FILE)):
            return "checkpoint", candidate
        if exists(join(candidate, CONFIG_FILE)):  # our run whose driver died before its first checkpoint
            return "run", candidate
    raise ConfigError(
        "checkpoint.resume",
        resume,
        f"neither a run directory (with Ray's {RAY_SNAPSHOT} or our "
        f"{CONFIG_FILE}), a run name under {output}, nor a checkpoint directory (with {META_FILE})",
    )


def init_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint the run starts from when it has none of its own, checked readable before any Ray work:
    for a new run the one --resume names; for a continued run that has not written a checkpoint yet (its driver
    died first), the one it was itself started from, which its config.yaml records, so that it does not start
    over from scratch."""
    if not cfg.checkpoint.resume:
        return None
    kind, target = find_resume_target(cfg.checkpoint.resume, resolve_output(cfg.checkpoint.output))
    if kind == "checkpoint":
        checked_checkpoint(target)  # CheckpointError now, not inside the workers
        return target
    if run_started(target):  # Ray restores the run's own latest checkpoint
        return None
    started_from = recorded_init_checkpoint(target)
    if started_from:
        try:
            checked_checkpoint(started_from)
        except CheckpointError as e:
            raise CheckpointError(
                f"{target} has no checkpoint of its own yet, and the checkpoint it was started from cannot be read: {e}"
            ) from None
    return started_from


def checked_checkpoint(path: str) -> dict:
    """The meta.json of a checkpoint a run will start from, checked on the driver before any Ray work: a local one
    file by file against its checksums; one under a URI for the presence of every file it lists (the worker
    verifies their checksums once it has downloaded them)."""
    if not is_uri(path):
        return verified_meta(path)
    meta = read_meta(path)
    missing = [name for name in (meta.get("files") or {}) if not exists(join(path, name))]
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} missing from the checkpoint (its {META_FILE} lists them)")
    return meta


def recorded_init_checkpoint(run_dir: str) -> Optional[str]:
    """The --resume CHECKPOINT a run was started from, as its config.yaml recorded it (None when it has none)."""
    path = run_config_file(run_dir)
    resolved = read_yaml(path).get("resolved") if path else None
    return resolved.get("init_checkpoint") if isinstance(resolved, dict) else None


def remove_unregistered_checkpoints(run_dir: str, result) -> list[str]:
    """Deletes the run's checkpoint folders that Ray never registered; returns their names. A worker that dies
    within Ray's health-check interval of reporting a checkpoint leaves it written but unregistered; the run goes on
    from the one before, and a resume on another worker count would never overwrite it. Local run directories
    only; nothing is deleted when Ray reports no checkpoints at all."""
    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).name)
    if is_uri(run_dir) or not kept:
        return []
    removed = []
    for folder in sorted(Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")):
        if folder.name not in kept and (folder / META_FILE).is_file():
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed
