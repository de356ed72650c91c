"""Knowledge distillation (timm's --kd-model-name): a teacher from a local file only, timm's loss-weight rules; per
kind (logit, feature, token) a KD term that is zero when the student is the teacher, pulls the student towards the
teacher, and (feature) a projection that trains and is checkpointed."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.distill import LogitDistillationLoss, build_distillation, build_teacher, loss_weights
from raytrain_cls.core.engine import TrainParts, autocast_factory, train_one_epoch

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
    return (
        Config()
        .update(
            {
                "dataset": "digits",
                "model": "test_resnet",
                "kd_model_name": "test_resnet",
                "kd_model_path": str(path),
                "smoothing": 0.0,
                **flat,
            }
        )
        .validate()
    )


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
    torch.manual_seed(5)
    student = timm.create_model("test_resnet", num_classes=4)
    loss = build_distillation(cfg, student, torch.nn.CrossEntropyLoss(), 4, DATA_CONFIG, CPU).loss
    parts = TrainParts(
        model=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.05),
        loss_fn=loss,
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
    )
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
    with pytest.raises(ConfigError, match="loss.kd_token_distill_type"):
        kd_cfg(path, kd_distill_type="token", kd_token_distill_type="medium")
    with pytest.raises(ConfigError, match="not a timm model"):
        kd_cfg(path, kd_model_name="resnet_nope")
    with pytest.raises(ConfigError, match="set --kd-model-name"):
        Config().update({"dataset": "digits", "kd_model_path": str(path)}).validate()


# ---- feature distillation --------------------------------------------------------------------------------------
def digits_batches(n: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_feature_distillation_projects_trains_and_checkpoints_the_projection(teacher_file, tmp_path):
    """A test_vit student (width 64) learning test_resnet's features (width 96): a projection bridges the
    widths, its weights and the student's move, the MSE term falls, and the projection rides in the checkpoint."""
    from raytrain_cls.core.state import TrainState

    path, _ = teacher_file
    cfg = kd_cfg(path, model="test_vit", kd_distill_type="feature", distill_loss_weight=1.0, task_loss_weight=0.0)
    torch.manual_seed(5)
    student = timm.create_model("test_vit", num_classes=4, img_size=32)
    kd = build_distillation(cfg, student, torch.nn.CrossEntropyLoss(), 4, DATA_CONFIG, CPU)
    teacher_width = timm.create_model("test_resnet").num_features
    assert kd.aux is not None and (kd.aux.in_features, kd.aux.out_features) == (student.num_features, teacher_width)
    logits, features = kd.train_module(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and features.shape == (2, teacher_width)
    before = kd.aux.weight.detach().clone()
    opt = torch.optim.SGD(kd.train_module.parameters(), lr=0.05)
    parts = TrainParts(
        model=kd.train_module,
        optimizer=opt,
        loss_fn=kd.loss,
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
        ema_source=student,
    )
    data = digits_batches()
    first, _ = train_one_epoch(0, data, parts, 0)
    for epoch in range(1, 4):
        last, _ = train_one_epoch(epoch, data, parts, 0)
    assert last["train_loss"] < first["train_loss"]  # the loss here is the feature MSE alone
    assert not torch.equal(kd.aux.weight, before)

    state = TrainState({}, student, opt, aux=kd.aux)
    state.save(tmp_path / "ckpt")
    fresh = build_distillation(
        cfg, timm.create_model("test_vit", num_classes=4, img_size=32), torch.nn.CrossEntropyLoss(), 4, DATA_CONFIG, CPU
    )
    TrainState(
        {}, fresh.train_module.student, torch.optim.SGD(fresh.train_module.parameters(), lr=0.05), aux=fresh.aux
    ).load(tmp_path / "ckpt")
    assert torch.equal(fresh.aux.weight, kd.aux.weight)


def test_feature_distillation_of_equal_widths_needs_no_projection(teacher_file):
    path, _ = teacher_file
    cfg = kd_cfg(path, kd_distill_type="feature")
    kd = build_distillation(
        cfg, timm.create_model("test_resnet", num_classes=4), torch.nn.CrossEntropyLoss(), 4, DATA_CONFIG, CPU
    )
    assert kd.aux is None and kd.train_module.projection is None


# ---- token distillation ----------------------------------------------------------------------------------------
def tiny_deit():
    torch.manual_seed(3)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=4, img_size=32, depth=1, embed_dim=32, num_heads=2
    )


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_token_distillation_trains_the_distillation_head_on_the_teacher(teacher_file, kind):
    """The distilled-token student returns (class, distillation) logits while training and their mean in eval;
    with the task weight at 0 only the distillation head learns, towards the teacher."""
    path, _ = teacher_file
    cfg = kd_cfg(
        path,
        model="deit_tiny_distilled_patch16_224",
        kd_distill_type="token",
        kd_token_distill_type=kind,
        distill_loss_weight=1.0,
        task_loss_weight=0.0,
    )
    student = tiny_deit()
    kd = build_distillation(cfg, student, torch.nn.CrossEntropyLoss(), 4, DATA_CONFIG, CPU)
    assert kd.train_module is student and kd.aux is None
    x = torch.randn(2, 3, 32, 32)
    student.train()
    cls_logits, dist_logits = student(x)
    student.eval()
    torch.testing.assert_close(student(x), (cls_logits + dist_logits) / 2)
    head = student.head.weight.detach().clone()
    parts = TrainParts(
        model=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_fn=kd.loss,
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
    )
    data = digits_batches()
    first, _ = train_one_epoch(0, data, parts, 0)
    for epoch in range(1, 6):
        last, _ = train_one_epoch(epoch, data, parts, 0)
    assert last["train_loss"] < first["train_loss"]
    assert torch.equal(student.head.weight, head)  # the class head had no loss to learn from


def test_token_distillation_needs_a_distilled_token_model(teacher_file):
    from raytrain_cls.run.driver import resolve

    path, _ = teacher_file
    cfg = kd_cfg(path, kd_distill_type="token")
    with pytest.raises(ConfigError, match="test_resnet has no distillation token"):
        resolve(cfg, {"CPU": 2.0})
