"""Logit distillation (timm's --kd-model-name, logit type): a teacher from a local file only, timm's loss-weight
rules, a KD term that is zero when the student is the teacher and pulls the student towards the teacher."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from raytrain_cls.config import Config, ConfigError
from raytrain_cls.distill import LogitDistillationLoss, build_teacher, loss_weights, with_distillation
from raytrain_cls.engine import TrainParts, autocast_factory, train_one_epoch

CPU = torch.device("cpu")
DATA_CONFIG = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture()
def teacher_file(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "teacher.pth")
    return tmp_path / "teacher.safetensors", model


def kd_cfg(path, **flat) -> Config:
    return Config().update({"dataset": "digits", "model": "test_resnet", "kd_model_name": "test_resnet",
                            "kd_model_path": str(path), "smoothing": 0.0, **flat}).validate()


def test_loss_weights_follow_timm():
    assert loss_weights(None, None) == (1.0, 1.0)
    assert loss_weights(0.7, None) == (1.0, 0.7)
    assert loss_weights(None, 0.3) == (0.3, pytest.approx(0.7))
    assert loss_weights(0.5, 0.2) == (0.2, 0.5)


def test_teacher_loads_from_safetensors_and_pth_and_is_frozen(teacher_file):
    path, reference = teacher_file
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    for file in (path, path.with_suffix(".pth")):
        teacher = build_teacher(kd_cfg(file), 4, CPU)
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert torch.allclose(teacher(x, return_features=False), reference(x), atol=1e-6)


def test_kd_term_is_zero_for_the_teacher_itself_and_weights_apply(teacher_file):
    path, reference = teacher_file
    teacher = build_teacher(kd_cfg(path), 4, CPU)
    ce = torch.nn.CrossEntropyLoss()
    # the teacher's own normalisation (timm's test_resnet: ImageNet's) as the student's: inputs pass unchanged
    mean, std = teacher.mean_kd.flatten().tolist(), teacher.std_kd.flatten().tolist()
    loss = LogitDistillationLoss(ce, teacher, mean, std, temperature=4.0, task_weight=0.3, distill_weight=0.7)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    reference.eval()
    logits = reference(x)
    assert torch.allclose(loss(logits, y, x), 0.3 * ce(logits, y), atol=1e-6)
    other = torch.randn(3, 4)
    assert loss(other, y, x) > 0.3 * ce(other, y) + 1e-4


def test_distillation_pulls_the_student_towards_the_teacher(teacher_file):
    path, _ = teacher_file
    cfg = kd_cfg(path, distill_loss_weight=1.0, task_loss_weight=0.0)
    loss = with_distillation(torch.nn.CrossEntropyLoss(), cfg, 4, DATA_CONFIG, CPU)
    torch.manual_seed(5)
    student = timm.create_model("test_resnet", num_classes=4)
    parts = TrainParts(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05), loss_fn=loss,
                       device=CPU, autocast=autocast_factory(CPU, False, torch.float32))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    first, _ = train_one_epoch(0, data, parts, 0)
    for epoch in range(1, 4):
        last, _ = train_one_epoch(epoch, data, parts, 0)
    assert last["train_loss"] < first["train_loss"]  # the loss here is the KD term alone


def test_distillation_options_are_checked_before_any_work(teacher_file, tmp_path):
    path, _ = teacher_file
    with pytest.raises(ConfigError, match="never downloads"):
        Config().update({"dataset": "digits", "kd_model_name": "test_resnet"}).validate()
    with pytest.raises(ConfigError, match="loss.kd_model_path"):
        kd_cfg(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="only logit distillation"):
        kd_cfg(path, kd_distill_type="feature")
    with pytest.raises(ConfigError, match="not a timm model"):
        kd_cfg(path, kd_model_name="resnet_nope")
    with pytest.raises(ConfigError, match="set --kd-model-name"):
        Config().update({"dataset": "digits", "kd_model_path": str(path)}).validate()
