"""Logit knowledge distillation (timm's --kd-model-name with --kd-distill-type logit).

The teacher is a timm model whose weights come from a local file (no downloads): a .safetensors file, one of
our checkpoint or export folders, or a .pth/.pt state dict read with weights_only=True. It is wrapped in timm's
DistillationTeacher (frozen, eval mode, converts the student's normalisation into its own) and lives inside the
loss, never inside the DDP-wrapped student. The loss is timm's: task_w * task + distill_w * KL(T) * T^2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn.functional as F

from .config import Config, ConfigError
from .state import MODEL_FILE, load_weights


def loss_weights(distill: Optional[float], task: Optional[float]) -> tuple[float, float]:
    """(task weight, distill weight) by timm's rules: both given -> as given (task defaults to 1); only the task
    weight -> complementary (distill = 1 - task); neither -> 1 and 1."""
    if distill is not None:
        return (task if task is not None else 1.0), distill
    if task is not None:
        return task, 1.0 - task
    return 1.0, 1.0


def teacher_weights_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / MODEL_FILE).is_file():
            raise ConfigError("loss.kd_model_path", path, f"a folder without {MODEL_FILE} (a checkpoint or an "
                              "export folder has one)")
        return p / MODEL_FILE
    return p


def load_teacher_state(model: torch.nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        load_weights(model, path)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)  # never arbitrary unpickling
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})


def build_teacher(cfg: Config, num_classes: int, device: torch.device):
    from timm.task.distillation import DistillationTeacher

    lc = cfg.loss
    in_chans = (cfg.model.input_size[0] if cfg.model.input_size else cfg.model.in_chans) or 3
    model = timm.create_model(lc.kd_model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    load_teacher_state(model, teacher_weights_file(lc.kd_model_path))
    for p in model.parameters():
        p.requires_grad_(False)
    return DistillationTeacher(model.to(device)).to(device).eval()


class LogitDistillationLoss(torch.nn.Module):
    """``loss(student_logits, target, inputs)``; the engine passes the inputs because the teacher needs them."""

    needs_input = True

    def __init__(self, task_loss: torch.nn.Module, teacher: torch.nn.Module, student_mean, student_std,
                 temperature: float, task_weight: float, distill_weight: float):
        super().__init__()
        self.task_loss, self.teacher = task_loss, teacher
        self.register_buffer("student_mean", torch.tensor(student_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std).view(1, -1, 1, 1), persistent=False)
        self.temperature, self.task_weight, self.distill_weight = temperature, task_weight, distill_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        task = self.task_loss(logits, target)
        with torch.no_grad():
            teacher_in = self.teacher.normalize_input(inputs, self.student_mean.to(inputs.dtype),
                                                      self.student_std.to(inputs.dtype))
            teacher_logits = self.teacher(teacher_in, return_features=False)
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                      reduction="batchmean", log_target=True) * (t * t)
        return self.task_weight * task + self.distill_weight * kd


def with_distillation(task_loss: torch.nn.Module, cfg: Config, num_classes: int, data_config: dict,
                      device: torch.device) -> torch.nn.Module:
    """The task loss, or, with --kd-model-name, the logit distillation loss around it."""
    lc = cfg.loss
    if not lc.kd_model_name:
        return task_loss
    task_w, distill_w = loss_weights(lc.distill_loss_weight, lc.task_loss_weight)
    return LogitDistillationLoss(task_loss, build_teacher(cfg, num_classes, device), data_config["mean"],
                                 data_config["std"], lc.kd_temperature, task_w, distill_w).to(device)
