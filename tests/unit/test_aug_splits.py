"""timm's --aug-splits with --jsd-loss, --split-bn and --resplit: split-major batches of a clean view and
augmented views of the same samples, the JSD loss over them, per-split BatchNorm statistics, and no erasing of
the clean split with --resplit. Bad files are refilled within every split."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from raytrain_cls.commands.export import _save_plain
from raytrain_cls.core.config import Config, ConfigError
from raytrain_cls.core.engine import TrainParts, autocast_factory, train_one_epoch
from raytrain_cls.core.loss import build_train_loss
from raytrain_cls.core.model import build_model
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.registry import build_source

CPU = torch.device("cpu")
DATA_CONFIG = {
    "input_size": [3, 16, 16],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@pytest.fixture()
def tree(tmp_path):
    for split in ("train", "validation"):
        for c, cls in enumerate(("ant", "bee")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                img = Image.linear_gradient("L").resize((24, 24)).convert("RGB")
                img.rotate(30 * i + 90 * c).save(d / f"{i}.png")
    return tmp_path


def cfg_for(root, **flat) -> Config:
    return (
        Config()
        .update(
            {
                "dataset": "folder",
                "data_dir": str(root),
                "model": "test_resnet",
                "batch_size": 4,
                "workers": 0,
                "seed": 3,
                "aug_splits": 3,
                "aa": "augmix-m5-w4-d2",
                **flat,
            }
        )
        .validate()
    )


def first_batch(cfg):
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1)
    loaders.set_epoch(0)
    return next(iter(loaders.train)), loaders


def test_batches_are_split_major_views_of_the_same_samples(tree):
    (x, y), _ = first_batch(cfg_for(tree))
    assert x.shape == (12, 3, 16, 16) and y.tolist() == y[:4].tolist() * 3
    clean, aug1, aug2 = x[:4], x[4:8], x[8:]
    assert not torch.equal(clean, aug1) and not torch.equal(aug1, aug2)  # AugMix on top of the same crop


def test_resplit_keeps_the_clean_split_unerased(tree):
    (plain, _), _ = first_batch(cfg_for(tree))
    (erased, _), _ = first_batch(cfg_for(tree, reprob=1.0, resplit=True))
    (all_erased, _), _ = first_batch(cfg_for(tree, reprob=1.0))
    assert torch.equal(erased[:4], plain[:4])  # the clean split: untouched with --resplit
    assert not torch.equal(all_erased[:4], plain[:4])  # without it, every view is erased


def test_bad_files_are_refilled_within_every_split(tree):
    (tree / "train" / "ant" / "zz.png").write_bytes(b"")
    cfg = cfg_for(tree, batch_size=13)  # the whole training set: the bad file is in the one batch
    (x, y), loaders = first_batch(cfg)
    assert loaders.train.bad.count == 1
    assert x.shape[0] == 39 and torch.equal(y.view(3, 13)[0], y.view(3, 13)[1])
    assert torch.equal(y.view(3, 13)[1], y.view(3, 13)[2])


def test_jsd_loss_is_ce_when_views_agree_and_larger_when_they_do_not():
    loss = build_train_loss(Config().update({"aug_splits": 3, "jsd_loss": True, "smoothing": 0.0}))
    torch.manual_seed(0)
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    same = loss(logits.repeat(3, 1), y.repeat(3))
    assert torch.allclose(same, torch.nn.functional.cross_entropy(logits, y), atol=1e-5)
    assert loss(torch.cat([logits, torch.randn(8, 5)]), y.repeat(3)) > same


def test_split_bn_trains_with_jsd_and_exports_plain_weights(tree, tmp_path):
    import timm

    cfg = cfg_for(tree, jsd_loss=True, split_bn=True)
    torch.manual_seed(0)
    model = build_model(cfg, 2, CPU)
    splits = [m for m in model.modules() if type(m).__name__ == "SplitBatchNorm2d"]
    assert splits and all(len(m.aux_bn) == 2 for m in splits)
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1)
    loaders.set_epoch(0)
    parts = TrainParts(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loss_fn=build_train_loss(cfg),
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
    )
    aux_before = splits[0].aux_bn[0].running_mean.clone()
    metrics, updates = train_one_epoch(0, loaders.train, parts, 0)
    assert updates == 3 and metrics["train_samples"] == 36 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert not torch.equal(splits[0].aux_bn[0].running_mean, aux_before)  # the augmented splits' own statistics
    _save_plain(model, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    plain = timm.create_model("test_resnet", num_classes=2)
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: no aux_bn keys left


def test_aug_split_combinations_refused_by_name():
    base = {"dataset": "digits"}
    for extra, key in (
        ({"aug_splits": 1}, "aug.aug_splits"),
        ({"jsd_loss": True}, "loss.jsd_loss"),
        ({"split_bn": True}, "model.split_bn"),
        ({"aug_splits": 2, "mixup": 0.2}, "aug.aug_splits"),
        ({"aug_splits": 2, "jsd_loss": True, "bce_loss": True}, "loss.jsd_loss"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config().update({**base, **extra}).validate()
