"""The per-worker train function that Ray Train runs on every worker: the only module that talks to ray.train.

Order matters and follows timm: model -> EMA (of the bare model) -> optimizer -> scheduler -> restore the
checkpoint -> DDP wrap. Ray has already created the process group (gloo on CPU, NCCL on GPU), so timm's own
distributed init is never called, and DDP is wrapped here rather than by ray.train.torch.prepare_model so EMA
and restore see the bare model.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from timm.utils import distribute_bn

from raytrain_cls.core.config import Config
from raytrain_cls.core.distill import build_distillation
from raytrain_cls.core.elastic import split_for
from raytrain_cls.core.engine import (
    EPOCH_TRAIN_METRICS,
    EVALUATION_KEYS,
    EpochProgress,
    TrainParts,
    amp_parts,
    evaluate,
    train_one_epoch,
)
from raytrain_cls.core.gcpause import release_collector
from raytrain_cls.core.loss import build_mixup, build_train_loss
from raytrain_cls.core.model import build_ema, build_model, compile_model, model_dtype, prepare_for_workers
from raytrain_cls.core.onednn import slow_bf16_note
from raytrain_cls.core.optim import build_optimizer, build_scheduler
from raytrain_cls.core.size_schedule import batch_loss_scale, reference_batch
from raytrain_cls.core.state import CheckpointError, TrainState, read_meta
from raytrain_cls.core.storage import join, write_bytes
from raytrain_cls.data import DataError, build_loaders, build_source
from raytrain_cls.data.loader import BadSampleLog, SkippingLoader
from raytrain_cls.data.ray_data import DATASET_NAME as RAY_DATASET
from raytrain_cls.data.ray_data import ray_data_loader, rows_per_worker
from raytrain_cls.run.checkpointer import CheckpointKeeper, RayTrainCheckpoints, checkpoint_name, report, restore
from raytrain_cls.run.console import WorkerConsole
from raytrain_cls.run.elastic import ResizeNotice
from raytrain_cls.run.preemption import PreemptionNotice
from raytrain_cls.run.startup import process_start, stamp
from raytrain_cls.run.tracking import Trackers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_better(metric: str, value: float, best) -> bool:
    """A tie counts as better: Ray's checkpoint retention also keeps the later of two equal scores, so the best
    epoch reported here is always one whose checkpoint still exists."""
    if best is None:
        return True
    return value <= best if metric == "loss" else value >= best


def quiet_per_report_logs() -> None:
    """Ray 2.60 logs every report (all metrics, every rank) at INFO through a logger named by its *file path*, so
    RunConfig(logging_config=...) does not reach it and it drowns the progress lines; raise that logger's level."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # a Ray without that module has no such logger either
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def recovery_score(metric: str) -> float:
    """The score a mid-epoch recovery checkpoint carries for Ray's retention: worse than any real evaluation, so it
    is never kept as a "best" checkpoint (only as the latest, until the next one replaces it)."""
    return 1e30 if metric == "loss" else -1.0


def run_ray_worker(config: dict, imported_at: float) -> dict:
    """A Ray Train worker's part of the run (the train function, worker_entry.train_loop_per_worker, which was
    imported at ``imported_at``): set up, restore, then the epochs; returns the last metrics."""
    entered = time.time()
    release_collector()  # held since the process started (driver.worker_runtime_env's set-up hook)
    quiet_per_report_logs()
    return WorkerRun(config, entered, WorkerContext.from_ray_train(), imported_at=imported_at).run()


@dataclass
class WorkerContext:
    """Where a worker's loop runs: its rank among ``world`` workers, its device, who keeps its checkpoints, whether
    it has been asked to stop between two updates, and (``draw``) where rank 0's console events go when a live bar
    is drawn in its own process. A Ray Train worker's come from Ray Train; a run that trains in the process that
    asked for it (a Tune trial's, a local run's: run/in_process.py) has its own."""

    rank: int
    world: int
    device: torch.device
    checkpoints: CheckpointKeeper = field(default_factory=RayTrainCheckpoints)
    stop_requested: Callable[[], bool] = lambda: False
    draw: Optional[Callable[[str, Any], None]] = None

    @classmethod
    def from_ray_train(cls) -> WorkerContext:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


class StopRequested(SystemExit):
    """Tune ended the trial mid-epoch: the loop ends between two updates, quietly (exit code 0, which Tune's trial
    thread takes for a graceful end)."""

    def __init__(self, code: int = 0):
        super().__init__(code)


# The numbers every evaluated epoch reports (WorkerRun.end_of_epoch): the metrics a Tune trial can be scored by,
# which `tune --metric` is checked against before any trial starts. EMA_EPOCH_METRICS (the raw model's scores
# beside the EMA's eval_*) come only with --model-ema. resumed_from, startup and the placement group are reported
# too, but are no numbers to optimise.
EPOCH_METRICS = (
    "epoch",
    *EPOCH_TRAIN_METRICS,
    "train_bad_samples",
    "eval_bad_samples",
    *(f"eval_{key}" for key in EVALUATION_KEYS),
    "num_updates",
    "best_metric",
    "best_epoch",
    "num_nodes",
    "global_batch",
)
EMA_EPOCH_METRICS = tuple(f"model_eval_{key}" for key in EVALUATION_KEYS)


class WorkerRun:
    """One worker's part of a run, in timm's order: set-up (data, model, EMA, optimizer, scheduler), restore, the
    DDP wrap, then per epoch: train (with recovery checkpoints on the way), end of epoch (evaluate, schedule,
    checkpoint). Everything a checkpoint carries is registered in ``self.state`` (core.state.TrainState)."""

    def __init__(self, config: dict, entered: float, where: WorkerContext, imported_at: Optional[float] = None):
        cfg = self.cfg = Config.from_dict(config)
        res = self.res = cfg.resolved
        # This worker's start-up stamps after the driver's (rank 0 reports them; startup.py). ``imported_at``: a
        # Ray Train worker's receipt of the train function; the loop's imports then end at ``entered``.
        self.stamps = {**(res.startup or {}), "worker_process": process_start(), "worker_entered": entered}
        if imported_at is not None:
            self.stamps["worker_imported"] = imported_at
        self.where = where
        self.rank, self.world = where.rank, where.world
        self.is_primary = self.rank == 0
        # An elastic run's group trains its share of the fixed global batch (more accumulation steps, or smaller
        # micro-batches, on fewer workers); everything built below reads the batch and accumulation from cfg.
        self.split = split_for(cfg, self.world)
        cfg.data.batch_size, cfg.optim.grad_accum_steps = self.split.batch_size, self.split.accum_steps
        self.device = device = where.device
        seed_everything(cfg.run.seed + self.rank)

        self.loaders = build_loaders(cfg, build_source(cfg), res.data_config, self.rank, self.world, device)
        if cfg.data.loader == "ray":
            self.loaders.train = ray_data_train_loader(cfg, self.world, device)
        stamp(self.stamps, "data_ready")
        self.model = prepare_for_workers(cfg, build_model(cfg, res.num_classes, device), self.world)
        self.ema = build_ema(cfg, self.model)
        # the module the loop trains: the model, or (feature distillation) the model with its projection
        self.kd = build_distillation(
            cfg, self.model, build_train_loss(cfg).to(device), res.num_classes, res.data_config, device
        )
        self.optimizer = build_optimizer(cfg, self.kd.train_module)
        self.updates_per_epoch = math.ceil(len(self.loaders.train) / cfg.optim.grad_accum_steps)
        self.scheduler, _ = build_scheduler(cfg, self.optimizer, self.updates_per_epoch)
        self.autocast, self.scaler = amp_parts(cfg.precision, device)
        self.state = TrainState(
            config, self.model, self.optimizer, self.scheduler, self.scaler, self.ema, aux=self.kd.aux
        )

        self.nodes = _count_nodes(self.world)
        self.console = WorkerConsole(res.progress_board, res.num_epochs, where.draw) if self.is_primary else None
        self.say = self.console.say if self.console else print  # to the live bar when there is one
        self.trackers = Trackers(cfg) if self.is_primary else None
        # Ray Data streams cannot resume mid-epoch, so a checkpoint there would not save the epoch's work.
        self.preemption = PreemptionNotice(cfg.checkpoint.preemption_check_interval if cfg.data.loader != "ray" else 0)
        self.resize = ResizeNotice(
            res.checkpoint_requests, cfg.checkpoint.preemption_check_interval, self.rank, self.world
        )
        self.epoch_sizes: list = []  # [workers, accumulation steps] of each group that trained the current epoch
        self.metric = cfg.checkpoint.eval_metric
        self.last_eval = None  # the latest evaluated metric, for the scheduler on epochs without evaluation
        if self.is_primary:
            self.announce()

    def announce(self) -> None:
        self.say(f"{self.world} training worker(s) on {self.nodes} node(s), device {self.device}")
        slow = slow_bf16_note(self.cfg.precision, self.device.type)
        if slow:
            self.say(slow)
        if self.cfg.data.data_on_device:
            held = [self.loaders.train.dataset, self.loaders.val.dataset]
            self.say(
                f"Data on the device: {sum(len(h.images) - h.images.count(None) for h in held):,} images, "
                f"{sum(h.nbytes for h in held) / 2**20:.1f} MiB per worker"
            )

    # ---- restore ---------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """The run's own latest checkpoint (recovery, --resume RUN), else --resume CHECKPOINT, else a fresh start;
        then timm's --start-epoch and --no-resume-opt."""
        cfg, state, scheduler = self.cfg, self.state, self.scheduler
        loaded, own_checkpoint = restore(state, cfg, self.rank, self.world, self.say, self.where.checkpoints)
        if cfg.sched.start_epoch is not None and not own_checkpoint:
            start_at_epoch(state, scheduler, cfg.sched.start_epoch, self.updates_per_epoch, cfg.sched.sched_on_updates)
            if self.is_primary:
                self.say(f"Starting at epoch {cfg.sched.start_epoch} (--start-epoch)")
        self.resumed_from = state.num_updates if loaded else -1
        if not loaded:
            return
        if own_checkpoint:
            self.stamps = first_group_stamps(loaded, self.stamps)
        if state.rank_states is not None and len(state.rank_states) != self.world:
            # Written by a different number of ranks: no RNG stream to continue, start fresh ones for this point.
            seed_everything(cfg.run.seed + self.rank + 7919 * state.num_updates)
        if self.is_primary:
            where = (
                f"epoch {state.in_epoch['epoch']} after batch {state.in_epoch['batches']}"
                if state.in_epoch
                else f"the end of epoch {state.epoch}"
            )
            self.say(f"Resumed from {loaded} at {where} (update {state.num_updates})")
        if (
            scheduler is not None
            and cfg.checkpoint.no_resume_opt
            and not state.in_epoch
            and cfg.sched.sched != "plateau"
        ):
            scheduler.step(state.start_epoch)  # the optimizer's LR was not restored: set it from the schedule

    def train_parts(self) -> TrainParts:
        """What one optimizer step touches, with the model wrapped in DDP (after restore, as timm) and compiled."""
        cfg, device = self.cfg, self.device
        train_model = self.kd.train_module
        if self.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None
            )
        train_model = compile_model(cfg, train_model)  # after DDP, as timm does
        if cfg.data.naflex_loader:
            batch_scale = batch_loss_scale(cfg.data.naflex_loss_scale, cfg.data.batch_size)
        elif cfg.data.train_img_sizes:
            batch_scale = batch_loss_scale(cfg.data.variable_batch_loss_scale, reference_batch(cfg))
        else:
            batch_scale = None
        return TrainParts(
            model=train_model,
            optimizer=self.optimizer,
            loss_fn=self.kd.loss,
            device=device,
            autocast=self.autocast,
            scaler=self.scaler,
            mixup=build_mixup(cfg, self.res.num_classes),
            scheduler=self.scheduler,
            ema=self.ema,
            ema_source=self.model,
            clip_grad=cfg.optim.clip_grad,
            clip_mode=cfg.optim.clip_mode,
            accum_steps=cfg.optim.grad_accum_steps,
            channels_last=cfg.model.channels_last,
            input_dtype=model_dtype(cfg),
            loss_scale=batch_scale,
        )

    # ---- the epochs ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.restore()
        self.parts = self.train_parts()
        stamp(self.stamps, "model_ready")
        last = {}
        try:
            for epoch in range(self.state.start_epoch, self.res.num_epochs):
                train_metrics, consumed = self.train_epoch(epoch)
                last = self.end_of_epoch(epoch, train_metrics, consumed) or last
        finally:  # also when stopped (StopRequested): a Tune trial's reused process would keep its writers open
            if self.trackers is not None:
                self.trackers.close()
        return last

    def train_epoch(self, epoch: int) -> tuple[dict, int]:
        """One pass over this rank's share of the epoch (the rest of it, after a mid-epoch recovery checkpoint).
        Returns the training metrics and the global samples the epoch had already trained on when it started."""
        cfg, state = self.cfg, self.state
        position = state.in_epoch if state.in_epoch and state.in_epoch["epoch"] == epoch else None
        consumed = position["samples"] if position else 0  # global samples of this epoch already trained on
        start_batch, carry = _continue_epoch(position, state.rank_states, self.rank, self.world, cfg.data.batch_size)
        size = [self.world, self.split.accum_steps]
        earlier = list(position.get("sizes", [])) if position else []
        self.epoch_sizes = earlier + ([size] if earlier[-1:] != [size] else [])
        self.loaders.set_epoch(epoch, consumed, position["batches"] if position else 0)
        start_batch = self.loaders.first_batch(start_batch)
        train_metrics, state.num_updates = train_one_epoch(
            epoch,
            self.loaders.train,
            self.parts,
            state.num_updates,
            use_mixup=cfg.aug.mixup_off_epoch == 0 or epoch < cfg.aug.mixup_off_epoch,
            log_interval=cfg.run.log_interval,
            log=self.log_step if self.is_primary else None,
            start_batch=start_batch,
            carry=carry,
            nan_patience=cfg.checkpoint.nan_patience,
            on_update=functools.partial(self.recovery_checkpoint, epoch, start_batch),
            on_step=functools.partial(self.tick, epoch, start_batch) if self.is_primary else None,
            on_log_batch=save_batch_images(self.res.run_dir) if self.is_primary and cfg.run.save_images else None,
        )
        state.in_epoch = None
        return train_metrics, consumed

    def log_step(self, metrics: dict) -> None:
        self.console.step(metrics)
        self.trackers.step(metrics)

    def tick(self, epoch: int, start_batch: int, step: int, steps: int, elapsed: float) -> None:
        first_step_then(self.console.tick, self.stamps, self.device)(epoch, step, steps, elapsed, start_batch)

    def recovery_checkpoint(self, epoch: int, start_batch: int, progress: EpochProgress) -> None:
        """After an optimizer update: a mid-epoch checkpoint every --recovery-interval updates, or at once on a
        preemption notice for one of the run's nodes."""
        if self.where.stop_requested():
            raise StopRequested
        if progress.batches_done >= progress.total_batches:
            return  # the epoch's own checkpoint comes next
        interval = self.cfg.checkpoint.recovery_interval
        due = bool(interval) and progress.num_updates % interval == 0
        notice = self.preemption.check(progress.num_updates)  # every rank asks: it is a collective
        resize = self.resize.check(progress.num_updates)  # likewise
        if not (due or notice or resize):
            return
        if notice and self.is_primary:
            self.say(
                f"Preemption notice: {notice}; recovery checkpoint at epoch {epoch}, update {progress.num_updates}"
            )
        if resize and self.is_primary:
            self.say(f"Ray Train is resizing the run: checkpoint at epoch {epoch}, update {progress.num_updates}")
        progress.ensure_finite()  # never a recovery checkpoint past --nan-patience
        state = self.state
        state.num_updates = progress.num_updates
        state.in_epoch = dict(
            epoch=epoch,
            batches=progress.batches_done,
            world_size=self.world,
            batch_size=self.cfg.data.batch_size,
            samples=self.loaders.samples_after(progress.batches_done - start_batch),
            sizes=self.epoch_sizes,
        )
        metrics = dict(
            epoch=epoch,
            step=progress.batches_done,
            num_updates=progress.num_updates,
            recovery=1,
            resumed_from=self.resumed_from,
            startup=self.stamps if self.is_primary else None,
            **{f"eval_{self.metric}": recovery_score(self.metric)},
        )
        if notice:
            metrics["preemption"] = 1
        report(
            state,
            metrics,
            self.rank,
            self.world,
            checkpoint_name(epoch, progress.num_updates),
            progress.loss_sum.item(),
            progress.seen.item(),
            keeper=self.where.checkpoints,
        )

    def end_of_epoch(self, epoch: int, train_metrics: dict, consumed: int) -> Optional[dict]:
        """Bad-sample accounting, BatchNorm sync, evaluation (model and EMA), the schedule's step, the best metric,
        and the epoch's checkpoint. Returns the epoch's metrics, or None on an epoch --val-interval skips."""
        cfg, state, scheduler, loaders = self.cfg, self.state, self.scheduler, self.loaders
        rank, world, say = self.rank, self.world, self.say
        dealt = loaders.samples_after(len(loaders.train)) - consumed
        train_bad = check_bad_samples(
            "training", loaders.train.bad, dealt, cfg.data.max_bad_fraction, epoch, rank, world, say
        )
        if world > 1 and cfg.model.dist_bn:
            # As timm: make every rank's BatchNorm statistics the same before evaluating and checkpointing.
            distribute_bn(self.model, world, cfg.model.dist_bn == "reduce")
            if self.ema is not None:
                distribute_bn(self.ema, world, cfg.model.dist_bn == "reduce")
        if not evaluates(epoch, cfg.checkpoint.val_interval, self.res.num_epochs):
            # timm's --val-interval: no evaluation, so no checkpoint either; the schedule still advances, given
            # the latest evaluated metric as timm does (plateau skips its decision when there is none yet).
            if scheduler is not None:
                scheduler.step(epoch + 1, self.last_eval)
            if self.is_primary:
                self.console.epoch(dict(epoch=epoch, **train_metrics, train_bad_samples=train_bad))
            return None
        loaders.val.bad.reset()
        eval_metrics = self.evaluate(self.model)
        val_bad = check_bad_samples(
            "validation", loaders.val.bad, self.res.val_samples, cfg.data.max_bad_fraction, epoch, rank, world, say
        )
        metrics = dict(epoch=epoch, **train_metrics, train_bad_samples=train_bad, eval_bad_samples=val_bad)
        if self.ema is not None:
            # As timm does: the EMA's accuracy is the run's accuracy; the raw model's is kept alongside.
            metrics.update({f"model_eval_{k}": v for k, v in eval_metrics.items()})
            eval_metrics = self.evaluate(self.ema.module)
        metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        metric = self.metric
        self.last_eval = eval_metrics[metric]
        if scheduler is not None:
            scheduler.step(epoch + 1, self.last_eval)
        state.epoch = epoch
        if is_better(metric, eval_metrics[metric], state.best_metric):
            state.best_metric, state.best_epoch = eval_metrics[metric], epoch
        metrics.update(
            num_updates=state.num_updates,
            best_metric=state.best_metric,
            best_epoch=state.best_epoch,
            resumed_from=self.resumed_from,
            num_nodes=self.nodes,
            **self.size_metrics(),
        )
        if self.is_primary:
            self.console.epoch(metrics)
            self.trackers.epoch(metrics)
            metrics["startup"] = self.stamps
        report(state, metrics, rank, world, checkpoint_name(epoch), keeper=self.where.checkpoints)
        return metrics

    def size_metrics(self) -> dict:
        """The worker counts and accumulation steps that trained the epoch ("1,2" and "2,1" when an elastic run
        grew from 1 to 2 workers during it) and its global batch: the same in every epoch, whatever the sizes."""
        return dict(
            workers=",".join(str(w) for w, _ in self.epoch_sizes),
            grad_accum=",".join(str(a) for _, a in self.epoch_sizes),
            global_batch=self.split.global_batch,
        )

    def evaluate(self, model: torch.nn.Module) -> dict:
        cfg = self.cfg
        return evaluate(
            model, self.loaders.val, self.device, self.autocast, cfg.model.channels_last, cfg.checkpoint.tta
        )


def first_group_stamps(checkpoint: str, stamps: dict) -> dict:
    """The start-up stamps to report: a worker group Ray restarted within the same fit continues with the first
    group's (its checkpoints carry them), so the run's start-up line describes the run's start, not the restart."""
    try:
        earlier = read_meta(checkpoint).get("metrics", {}).get("startup") or {}
    except CheckpointError:  # e.g. a bucket path Ray gives without its scheme: keep this group's stamps
        return stamps
    return dict(earlier) if earlier.get("fit") is not None and earlier.get("fit") == stamps.get("fit") else stamps


def first_step_then(fn, stamps: dict, device: torch.device):
    """``fn``, after stamping the end of the run's first training step (a device sync, once per run)."""
    if "first_step" not in stamps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamp(stamps, "first_step")
    return fn


def start_at_epoch(state: TrainState, scheduler, epoch: int, updates_per_epoch: int, on_updates: bool) -> None:
    """timm's --start-epoch: the run continues as if ``epoch`` epochs had been trained (counters and the LR
    schedule there), whatever epoch a --resume checkpoint was written at."""
    state.epoch, state.in_epoch, state.rank_states = epoch - 1, None, None
    state.num_updates = epoch * updates_per_epoch
    if scheduler is not None and epoch > 0:
        if on_updates:
            scheduler.step_update(state.num_updates)
        else:
            scheduler.step(epoch)


def evaluates(epoch: int, interval: int, num_epochs: int) -> bool:
    """timm's --val-interval: every interval-th epoch, and always the last one."""
    return (epoch + 1) % interval == 0 or epoch == num_epochs - 1


def save_batch_images(run_dir: str):
    """timm's --save-images: the batch as a JPEG grid (min-max normalised, as timm does) under <run dir>/images."""
    import io

    import torchvision

    def save(x: torch.Tensor, epoch: int, step: int) -> None:
        buf = io.BytesIO()
        torchvision.utils.save_image(x.float().cpu(), buf, format="jpeg", padding=0, normalize=True)
        write_bytes(join(run_dir, f"images/train-{epoch:04d}-{step:06d}.jpg"), buf.getvalue())

    return save


def ray_data_train_loader(cfg: Config, world: int, device: torch.device) -> SkippingLoader:
    """This worker's streaming_split share of the Ray Dataset the driver passed to the trainer."""
    import ray.train

    a, res = cfg.aug, cfg.resolved
    return ray_data_loader(
        ray.train.get_dataset_shard(RAY_DATASET),
        rows_per_worker(res.train_samples, world),
        cfg.data.batch_size,
        res.data_config,
        device,
        re_prob=a.reprob,
        re_mode=a.remode,
        re_count=a.recount,
    )


def check_bad_samples(
    split: str, log: BadSampleLog, dealt: int, max_fraction: float, epoch: int, rank: int, world: int, say=print
) -> int:
    """All ranks' unreadable samples of this epoch: logged with examples on rank 0, an error past the limit.
    Every rank takes the same decision from the same gathered numbers, so no rank is left waiting."""
    import torch.distributed as dist

    mine = (log.count, log.examples)
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    count = sum(c for c, _ in gathered)
    examples = [e for _, ex in gathered for e in ex][: BadSampleLog.KEEP]
    if count > max_fraction * max(dealt, 1):
        raise DataError(
            f"{count} of {dealt} {split} samples in epoch {epoch} could not be read, more than "
            f"--max-bad-fraction {max_fraction}: " + "; ".join(examples)
        )
    if count and rank == 0:
        say(f"Skipped {count} unreadable {split} image(s) in epoch {epoch}: " + "; ".join(examples[:5]))
    return count


def _count_nodes(world: int) -> int:
    """How many Ray nodes this worker group spans (shown to the user, reported with every epoch)."""
    if world == 1:  # also where no Ray runs at all (local mode)
        return 1
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    ids = [None] * world
    dist.all_gather_object(ids, node)
    return len(set(ids))


def _continue_epoch(
    position: Optional[dict], rank_states: Optional[list], rank: int, world: int, batch: int
) -> tuple[int, tuple[float, float]]:
    """(first batch index, this rank's (loss_sum, seen) so far) for an epoch a recovery checkpoint interrupted."""
    if not position:
        return 0, (0.0, 0.0)
    ranks = rank_states or []
    if position["world_size"] == world and position["batch_size"] == batch and len(ranks) == world:
        return position["batches"], (ranks[rank]["loss_sum"], ranks[rank]["seen"])
    # Another worker count: the epoch continues from the same global sample; the running sums are reduced
    # across ranks at the end of the epoch anyway, so rank 0 carries them all.
    carry = (sum(r["loss_sum"] for r in ranks), sum(r["seen"] for r in ranks)) if rank == 0 else (0.0, 0.0)
    return position["samples"] // (batch * world), carry
