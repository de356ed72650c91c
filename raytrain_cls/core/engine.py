"""train_one_epoch / evaluate: the plain-PyTorch heart of the loop. No Ray here, so it runs in any process.

Metrics stay on the device as running sums; the host reads them (.item()) only every --log-interval steps and at
the end of an epoch, so the GPU is never stalled by a per-step sync. Cross-rank sums use torch.distributed when
a process group exists (Ray Train creates it), which keeps evaluation exact: every validation sample counted once.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

LogFn = Callable[[dict], None]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainParts:
    """Everything one optimizer step touches."""

    model: torch.nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    device: torch.device
    autocast: Callable[[], ContextManager]
    scaler: Optional[torch.amp.GradScaler] = None
    mixup: Optional[Callable] = None
    scheduler: Optional[object] = None  # a timm Scheduler
    ema: Optional[torch.nn.Module] = None  # timm ModelEmaV3
    ema_source: Optional[torch.nn.Module] = None  # the bare model the EMA follows, when ``model`` wraps more
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    accum_steps: int = 1
    channels_last: bool = False
    input_dtype: Optional[torch.dtype] = None  # --model-dtype: inputs cast to the weights' dtype
    loss_scale: Optional[Callable[[int], float]] = None  # NaFlex: a batch's loss factor from its size


def autocast_factory(device: torch.device, enabled: bool, dtype: torch.dtype) -> Callable[[], ContextManager]:
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def amp_parts(precision, device: torch.device) -> tuple[Callable[[], ContextManager], Optional[torch.amp.GradScaler]]:
    """(autocast factory, GradScaler or None) from the config's precision group: float16 autocast steps through a
    GradScaler, bfloat16 needs none. The per-worker loop and `bench step`'s bare loop share it."""
    dtype = torch.float16 if precision.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if precision.amp and dtype == torch.float16 else None
    return autocast_factory(device, precision.amp, dtype), scaler


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


Inputs = Union[torch.Tensor, dict]  # an image batch, or (NaFlex) a dict of patches, coordinates and validity


def to_device(
    x: Inputs, y: torch.Tensor, device: torch.device, channels_last: bool, dtype: Optional[torch.dtype] = None
):
    y = y.to(device, non_blocking=True)
    if isinstance(x, dict):  # NaFlex: only the pixel values take the weights' dtype
        return {
            k: v.to(device, dtype=dtype if k == "patches" else None, non_blocking=True)
            if isinstance(v, torch.Tensor)
            else v
            for k, v in x.items()
        }, y
    x = x.to(device, dtype=dtype, non_blocking=True)  # dtype: the weights' (--model-dtype), else unchanged
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def batch_size(x: Inputs) -> int:
    return x["patches"].shape[0] if isinstance(x, dict) else x.shape[0]


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g["lr"] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


@dataclass
class EpochProgress:
    """Where this rank stands in the epoch; handed to ``on_update`` so a recovery checkpoint can record it."""

    batches_done: int  # batches of the epoch done by every rank (same count on all ranks)
    total_batches: int
    num_updates: int
    loss_sum: torch.Tensor  # device scalar: sum over this rank's finite-loss samples
    seen: torch.Tensor  # device scalar: samples counted in loss_sum
    ensure_finite: Callable[[], None] = lambda: None  # raises NonFiniteLossError now (a sync): before a checkpoint


class FiniteWatch:
    """Reads the device's count of consecutive non-finite losses without stalling the host every few steps.

    On CUDA, each ``poll`` starts a non-blocking copy of the count into pinned memory and reads the copy the
    previous poll started, long finished by then: a NaN streak is caught one poll late, and the host never waits
    for the step in flight (it keeps queueing the next batches' work ahead of the GPU). ``now`` reads at once
    (a sync): at log lines, which sync anyway, before a checkpoint, and at the end of the epoch."""

    def __init__(self, device: torch.device, patience: int, epoch: int, deferred: Optional[bool] = None):
        self.cuda = device.type == "cuda"
        self.deferred = self.cuda if deferred is None else deferred  # on the CPU a read costs nothing
        self.patience, self.epoch = patience, epoch
        self.pending = None  # (host copy, CUDA event or None, step)

    def poll(self, worst: torch.Tensor, step: int) -> None:
        if not self.deferred:
            return self.now(worst, step)
        if self.pending is not None:
            host, event, at = self.pending
            if event is not None:
                event.synchronize()
            _check_finite(host, self.patience, self.epoch, at)
        if self.cuda:
            host = torch.empty((), dtype=worst.dtype, pin_memory=True)
            host.copy_(worst, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = worst.clone(), None
        self.pending = (host, event, step)

    def now(self, worst: torch.Tensor, step: int) -> None:
        _check_finite(worst, self.patience, self.epoch, step)


# The keys of the metrics train_one_epoch returns, which the worker reports as they are: `tune --metric` is
# checked against them (run/worker.py EPOCH_METRICS), so a renamed or added key belongs here too.
EPOCH_TRAIN_METRICS = ("train_loss", "lr", "train_samples", "train_time", "img_per_sec", "updates_per_epoch")


def train_one_epoch(
    epoch: int,
    loader,
    parts: TrainParts,
    num_updates: int,
    *,
    use_mixup: bool = True,
    log_interval: int = 50,
    log: Optional[LogFn] = None,
    start_batch: int = 0,
    carry: tuple[float, float] = (0.0, 0.0),
    nan_patience: int = 5,
    on_update: Optional[Callable[[EpochProgress], None]] = None,
    on_step: Optional[Callable[[int, int, float], None]] = None,
    on_log_batch: Optional[Callable[[torch.Tensor, int, int], None]] = None,
) -> tuple[dict, int]:
    """One pass over this rank's share of the data. Returns (metrics averaged over all ranks, num_updates).

    ``start_batch``/``carry`` continue an epoch that a recovery checkpoint interrupted: the loader then yields only
    the remaining batches, and ``carry`` is this rank's (loss_sum, seen) so far. A non-finite loss is tolerated
    for fewer than ``nan_patience`` consecutive steps (an fp16 GradScaler skips those steps); the streak lives on
    the device and is read only every ``nan_patience`` steps, at log lines and at the end, never once per step.
    ``on_step(step, steps, elapsed)`` is told the position after every batch (no device value: no sync);
    ``on_log_batch(inputs, epoch, step)`` sees the batch (after mixup) at every log line (timm's --save-images).
    """
    p = parts
    p.model.train()
    accum = p.accum_steps
    num_batches = start_batch + len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_accum = num_batches % accum or accum  # micro-batches in the epoch's final, possibly short, update
    loss_sum = torch.tensor(float(carry[0]), device=p.device, dtype=torch.float64)
    seen = torch.tensor(float(carry[1]), device=p.device, dtype=torch.float64)
    streak = torch.zeros((), device=p.device, dtype=torch.int64)  # consecutive non-finite losses
    worst = torch.zeros((), device=p.device, dtype=torch.int64)
    watch = FiniteWatch(p.device, nan_patience, epoch)
    local_seen = 0
    start = last_log = time.perf_counter()
    data_time = 0.0
    tick = time.perf_counter()
    p.optimizer.zero_grad(set_to_none=True)
    for batch_idx, (x, y) in enumerate(loader, start=start_batch):
        data_time += time.perf_counter() - tick
        final_group = batch_idx >= num_batches - last_accum
        group_size = last_accum if final_group else accum
        stepping = (batch_idx + 1) % accum == 0 or batch_idx == num_batches - 1
        x, y = to_device(x, y, p.device, p.channels_last, p.input_dtype)
        if p.mixup is not None and use_mixup:
            x, y = p.mixup(x, y)
        # Skip DDP's gradient all-reduce on micro-batches that do not end in an optimizer step.
        sync = contextlib.nullcontext() if stepping or not hasattr(p.model, "no_sync") else p.model.no_sync()
        with sync:
            with p.autocast():
                out = p.model(x)
                # a distillation loss also needs the inputs (its teacher sees the same batch)
                loss = p.loss_fn(out, y, x) if getattr(p.loss_fn, "needs_input", False) else p.loss_fn(out, y)
            n = batch_size(x)
            scaled = loss / group_size if p.loss_scale is None else loss * (p.loss_scale(n) / group_size)
            (p.scaler.scale(scaled) if p.scaler else scaled).backward()
        if stepping:
            _optimizer_step(p)
            num_updates += 1
            if p.ema is not None:
                p.ema.update(p.ema_source if p.ema_source is not None else p.model, step=num_updates)
            if p.scheduler is not None:
                p.scheduler.step_update(num_updates=num_updates)
        finite = torch.isfinite(loss.detach())
        streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
        worst = torch.maximum(worst, streak)
        loss_sum += torch.where(finite, loss.detach().double() * n, 0.0)
        seen += finite.double() * n
        local_seen += n
        step = batch_idx + 1
        logging_now = log is not None and (step % log_interval == 0 or batch_idx == num_batches - 1)
        if logging_now:
            watch.now(worst, step)
        elif step % nan_patience == 0:
            watch.poll(worst, step)
        if logging_now:
            now = time.perf_counter()
            log(
                dict(
                    epoch=epoch,
                    step=step,
                    steps=num_batches,
                    loss=loss.item(),
                    lr=current_lr(p.optimizer),
                    img_per_sec=local_seen * world_size() / max(now - start, 1e-9),
                    data_time=data_time,
                    elapsed=now - start,
                    interval=now - last_log,
                )
            )
            last_log = now
            if on_log_batch is not None:
                on_log_batch(x.detach(), epoch, step)
        if stepping and on_update is not None:
            on_update(
                EpochProgress(
                    step,
                    num_batches,
                    num_updates,
                    loss_sum,
                    seen,
                    ensure_finite=functools.partial(watch.now, worst, step),
                )
            )
        if on_step is not None:
            on_step(step, num_batches, time.perf_counter() - start)
        tick = time.perf_counter()
    watch.now(worst, num_batches)
    totals = all_reduce_sum(torch.stack([loss_sum, seen]))
    elapsed = time.perf_counter() - start
    train_loss = (totals[0] / totals[1].clamp(min=1)).item()
    if totals[1].item() == 0:
        raise NonFiniteLossError(f"every training loss in epoch {epoch} was non-finite")
    return dict(
        train_loss=train_loss,
        lr=current_lr(p.optimizer),
        train_samples=int(totals[1].item()),
        train_time=elapsed,
        img_per_sec=local_seen * world_size() / max(elapsed, 1e-9),
        updates_per_epoch=updates_per_epoch,
    ), num_updates


def _check_finite(worst: torch.Tensor, patience: int, epoch: int, step: int) -> None:
    n = int(worst.item())
    if n >= patience:
        raise NonFiniteLossError(
            f"the loss was NaN/Inf for {n} consecutive steps (--nan-patience {patience}), "
            f"last seen by epoch {epoch} step {step}: lower the LR, enable --clip-grad, or "
            f"check the data"
        )


def _optimizer_step(p: TrainParts) -> None:
    params = p.model.parameters()
    if p.scaler is not None:
        if p.clip_grad is not None:
            p.scaler.unscale_(p.optimizer)
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        if p.clip_grad is not None:
            dispatch_clip_grad(params, p.clip_grad, mode=p.clip_mode)
        p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def tta_logits(model: torch.nn.Module, x: torch.Tensor, tta: int = 0) -> torch.Tensor:
    """Float logits; with --tta > 0, averaged with those of the horizontally flipped images (flip TTA)."""
    out = model(x).float()
    if tta > 0:
        out = (out + model(torch.flip(x, dims=[3])).float()) / 2
    return out


# The keys evaluate returns; the worker reports them as eval_<key> (and model_eval_<key> beside an EMA).
EVALUATION_KEYS = ("loss", "top1", "top5", "samples")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast: Callable[[], ContextManager],
    channels_last: bool = False,
    tta: int = 0,
) -> dict:
    """Loss, top-1 and top-5 (percent, as timm reports them) over the union of all ranks' validation shards."""
    model.eval()
    weights = next(model.parameters(), None)
    dtype = weights.dtype if weights is not None and weights.dtype in (torch.bfloat16, torch.float16) else None
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, top1, top5, count
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last, dtype)
        with autocast():
            logits = tta_logits(model, x, tta)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y[:, None])
        # The count as a fill on the device: torch.tensor(n, device=cuda) would copy from pageable memory, which
        # waits for the stream, once per batch.
        sums += torch.stack(
            [
                loss_fn(logits, y).double(),
                hits[:, :1].sum().double(),
                hits.sum().double(),
                torch.full((), float(len(y)), device=device, dtype=torch.float64),
            ]
        )
    loss_sum, top1, top5, count = all_reduce_sum(sums).tolist()
    n = max(count, 1.0)
    return dict(loss=loss_sum / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, samples=int(count))
