"""Knowledge distillation, timm's three kinds (--kd-model-name with --kd-distill-type):

* logit:   the student's logits follow the teacher's (KL at temperature T, times T^2);
* feature: the student's pooled pre-logit features (projected to the teacher's width when they differ) follow the
           teacher's (MSE); the projection is trained with the student and checkpointed beside it;
* token:   a distilled-token model (DeiT/PiT *_distilled) trains its distillation head on the teacher (soft: KL at
           T; hard: cross entropy with the teacher's argmax) and its class head on the labels.

The teacher is a timm model whose weights come from a local file (no downloads): a .safetensors file, one of
our checkpoint or export folders, or a .pth/.pt state dict read with weights_only=True. It is wrapped in timm's
DistillationTeacher (frozen, eval mode, converts the student's normalisation into its own) and lives inside the
loss, never inside the DDP-wrapped student. Loss weights follow timm: task_w * task + distill_w * distill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn.functional as F

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.state import MODEL_FILE, load_weights


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
            raise ConfigError(
                "loss.kd_model_path", path, f"a folder without {MODEL_FILE} (a checkpoint or an export folder has one)"
            )
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


class _TeacherLoss(torch.nn.Module):
    """``loss(output, target, inputs)``; the engine passes the inputs because the teacher needs them."""

    needs_input = True

    def __init__(
        self,
        task_loss: torch.nn.Module,
        teacher: torch.nn.Module,
        student_mean,
        student_std,
        task_weight: float,
        distill_weight: float,
    ):
        super().__init__()
        self.task_loss, self.teacher = task_loss, teacher
        self.register_buffer("student_mean", torch.tensor(student_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std).view(1, -1, 1, 1), persistent=False)
        self.task_weight, self.distill_weight = task_weight, distill_weight

    @torch.no_grad()
    def _teacher(self, inputs: torch.Tensor, features: bool = False) -> torch.Tensor:
        teacher_in = self.teacher.normalize_input(
            inputs, self.student_mean.to(inputs.dtype), self.student_std.to(inputs.dtype)
        )
        return self.teacher(teacher_in, return_features=features).float()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


class LogitDistillationLoss(_TeacherLoss):
    def __init__(
        self,
        task_loss,
        teacher,
        student_mean,
        student_std,
        temperature: float,
        task_weight: float,
        distill_weight: float,
    ):
        super().__init__(task_loss, teacher, student_mean, student_std, task_weight, distill_weight)
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        kd = soft_kl(logits, self._teacher(inputs), self.temperature)
        return self.task_weight * self.task_loss(logits, target) + self.distill_weight * kd


class FeatureDistillationLoss(_TeacherLoss):
    """Takes the (logits, projected features) pair the training module returns."""

    def forward(self, output: tuple, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        logits, features = output
        kd = F.mse_loss(features.float(), self._teacher(inputs, features=True))
        return self.task_weight * self.task_loss(logits, target) + self.distill_weight * kd


class TokenDistillationLoss(_TeacherLoss):
    """Takes the (class-head, distillation-head) logits a distilled-token model returns while training."""

    def __init__(
        self,
        task_loss,
        teacher,
        student_mean,
        student_std,
        temperature: float,
        hard: bool,
        task_weight: float,
        distill_weight: float,
    ):
        super().__init__(task_loss, teacher, student_mean, student_std, task_weight, distill_weight)
        self.temperature, self.hard = temperature, hard

    def forward(self, output: tuple, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        logits, dist_logits = output
        teacher_logits = self._teacher(inputs)
        if self.hard:
            kd = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
        else:
            kd = soft_kl(dist_logits, teacher_logits, self.temperature)
        return self.task_weight * self.task_loss(logits, target) + self.distill_weight * kd


def feature_dim(model: torch.nn.Module, key: str) -> int:
    """Width of a timm model's pooled pre-logit features (what forward_head(pre_logits=True) returns); ``key``
    names the setting that gives it when the model does not say."""
    for attr in ("head_hidden_size", "num_features"):
        if isinstance(getattr(model, attr, None), int):
            return getattr(model, attr)
    raise ConfigError(
        key, None, f"{type(model).__name__} does not say its feature width: set --{key.split('.')[1].replace('_', '-')}"
    )


@dataclass
class Distillation:
    """What the training loop runs: the loss, the module it calls (the student, or the student with the feature
    projection), and trainable modules outside the model that the checkpoint must carry (the projection)."""

    loss: torch.nn.Module
    train_module: torch.nn.Module
    aux: Optional[torch.nn.Module] = None


def build_distillation(
    cfg: Config,
    model: torch.nn.Module,
    task_loss: torch.nn.Module,
    num_classes: int,
    data_config: dict,
    device: torch.device,
) -> Distillation:
    """The task loss and the bare model, or, with --kd-model-name, the distillation set-up around them."""
    lc = cfg.loss
    if not lc.kd_model_name:
        return Distillation(task_loss, model)
    task_w, distill_w = loss_weights(lc.distill_loss_weight, lc.task_loss_weight)
    teacher = build_teacher(cfg, num_classes, device)
    norm = (data_config["mean"], data_config["std"])
    if lc.kd_distill_type == "feature":
        from timm.task.distillation import FeatureDistillationTrainableModule

        width = lc.kd_student_feature_dim or feature_dim(model, "loss.kd_student_feature_dim")
        teacher_width = lc.kd_teacher_feature_dim or feature_dim(teacher.model, "loss.kd_teacher_feature_dim")
        projection = torch.nn.Linear(width, teacher_width).to(device) if width != teacher_width else None
        loss = FeatureDistillationLoss(task_loss, teacher, *norm, task_w, distill_w)
        return Distillation(loss.to(device), FeatureDistillationTrainableModule(model, projection), projection)
    if lc.kd_distill_type == "token":
        model.set_distilled_training(True)  # training forward: (class logits, distillation logits)
        loss = TokenDistillationLoss(
            task_loss, teacher, *norm, lc.kd_temperature, lc.kd_token_distill_type == "hard", task_w, distill_w
        )
        return Distillation(loss.to(device), model)
    loss = LogitDistillationLoss(task_loss, teacher, *norm, lc.kd_temperature, task_w, distill_w)
    return Distillation(loss.to(device), model)
