"""train_one_epoch / evaluate: the plain-PyTorch heart of the loop. No Ray here, so it runs in any process.

Metrics stay on the device as running sums; the host reads them (.item()) only every --log-interval steps and at
the end of an epoch, so the GPU is never stalled by a per-step sync. Cross-rank sums use torch.distributed when
a process group exists (Ray Train creates it), which keeps evaluation exact: every validation sample counted once.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

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
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    accum_steps: int = 1
    channels_last: bool = False


def autocast_factory(device: torch.device, enabled: bool, dtype: torch.dtype) -> Callable[[], ContextManager]:
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g["lr"] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(epoch: int, loader, parts: TrainParts, num_updates: int, *, use_mixup: bool = True,
                    log_interval: int = 50, log: Optional[LogFn] = None) -> tuple[dict, int]:
    """One pass over this rank's share of the data. Returns (metrics averaged over all ranks, num_updates)."""
    p = parts
    p.model.train()
    accum = p.accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_accum = num_batches % accum or accum  # micro-batches in the epoch's final, possibly short, update
    loss_sum = torch.zeros((), device=p.device, dtype=torch.float64)
    seen = 0
    start = last_log = time.perf_counter()
    data_time = 0.0
    tick = time.perf_counter()
    p.optimizer.zero_grad(set_to_none=True)
    for batch_idx, (x, y) in enumerate(loader):
        data_time += time.perf_counter() - tick
        final_group = batch_idx >= num_batches - last_accum
        group_size = last_accum if final_group else accum
        stepping = (batch_idx + 1) % accum == 0 or batch_idx == num_batches - 1
        x, y = _to_device(x, y, p.device, p.channels_last)
        if p.mixup is not None and use_mixup:
            x, y = p.mixup(x, y)
        # Skip DDP's gradient all-reduce on micro-batches that do not end in an optimizer step.
        sync = contextlib.nullcontext() if stepping or not hasattr(p.model, "no_sync") else p.model.no_sync()
        with sync:
            with p.autocast():
                loss = p.loss_fn(p.model(x), y)
            (p.scaler.scale(loss / group_size) if p.scaler else loss / group_size).backward()
        if stepping:
            _optimizer_step(p)
            num_updates += 1
            if p.ema is not None:
                p.ema.update(p.model, step=num_updates)
            if p.scheduler is not None:
                p.scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach().double() * x.shape[0]
        seen += x.shape[0]
        if log is not None and ((batch_idx + 1) % log_interval == 0 or batch_idx == num_batches - 1):
            now = time.perf_counter()
            batch_loss = loss.item()  # the only host sync, once per log interval
            if not math.isfinite(batch_loss):
                raise NonFiniteLossError(f"loss is {batch_loss} at epoch {epoch} step {batch_idx}")
            log(dict(epoch=epoch, step=batch_idx + 1, steps=num_batches, loss=batch_loss,
                     lr=current_lr(p.optimizer), img_per_sec=seen * world_size() / max(now - start, 1e-9),
                     data_time=data_time, elapsed=now - start, interval=now - last_log))
            last_log = now
        tick = time.perf_counter()
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=p.device, dtype=torch.float64)]))
    elapsed = time.perf_counter() - start
    train_loss = (totals[0] / totals[1].clamp(min=1)).item()
    if not math.isfinite(train_loss):
        raise NonFiniteLossError(f"training loss is {train_loss} in epoch {epoch}")
    return dict(train_loss=train_loss, lr=current_lr(p.optimizer), train_samples=int(totals[1].item()),
                train_time=elapsed, img_per_sec=totals[1].item() / max(elapsed, 1e-9),
                updates_per_epoch=updates_per_epoch), num_updates


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
def evaluate(model: torch.nn.Module, loader, device: torch.device, autocast: Callable[[], ContextManager],
             channels_last: bool = False) -> dict:
    """Loss, top-1 and top-5 (percent, as timm reports them) over the union of all ranks' validation shards."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, top1, top5, count
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y[:, None])
        sums += torch.stack([loss_fn(logits, y).double(), hits[:, :1].sum().double(), hits.sum().double(),
                             torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    loss_sum, top1, top5, count = all_reduce_sum(sums).tolist()
    n = max(count, 1.0)
    return dict(loss=loss_sum / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n, samples=int(count))
