"""timm train.py options that change behaviour inside the loop, each shown to do so (not only to parse)."""
from __future__ import annotations

import pytest
import timm
import torch

from raytrain_cls.config import Config, ConfigError, load_config
from raytrain_cls.model import build_model, compile_model
from raytrain_cls.optim import build_optimizer
from raytrain_cls.trainer import resolve_scaling

CPU = torch.device("cpu")


def cfg_with(**kw) -> Config:
    return load_config("digits", {"model": "resnet10t", **kw})


def test_drop_block_is_wired_and_drops_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model(cfg_with(drop_block=0.9), 10, CPU)
    blocks = [m for m in model.modules() if type(m).__name__ == "DropBlock2d"]
    assert blocks and all(b.drop_prob == 0.9 for b in blocks)
    x = torch.randn(2, 8, 14, 14)
    model.train()
    assert not torch.equal(blocks[0](x), x)
    model.eval()
    assert torch.equal(blocks[0](x), x)


def test_bn_momentum_and_eps_reach_every_batchnorm():
    model = build_model(cfg_with(bn_momentum=0.01, bn_eps=1e-3), 10, CPU)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)


def test_grad_checkpointing_is_switched_on_and_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(cfg_with(), 10, CPU)
    ckpt = build_model(cfg_with(grad_checkpointing=True), 10, CPU)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        m.eval()
        m(x).sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_torchcompile_wraps_the_model_and_keeps_its_outputs():
    cfg = cfg_with(torchcompile="eager")
    model = build_model(cfg, 10, CPU).eval()
    compiled = compile_model(cfg, model)
    assert compiled is not model
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), model(x))
    with pytest.raises(ConfigError, match="not a torch.compile backend"):
        cfg_with(torchcompile="inductr")


def test_layer_decay_gives_layers_their_own_lr_scale():
    model = timm.create_model("test_vit", num_classes=4)
    plain = build_optimizer(load_config("digits", {"opt": "adamw", "lr": 1e-3}), model)
    decayed = build_optimizer(load_config("digits", {"opt": "adamw", "lr": 1e-3, "layer_decay": 0.5}), model)
    scales = {g.get("lr_scale", 1.0) for g in decayed.param_groups}
    assert len(scales) > 2 and min(scales) < 0.5 and max(scales) == 1.0
    assert {g.get("lr_scale", 1.0) for g in plain.param_groups} == {1.0}


def test_opt_kwargs_reach_the_optimizer():
    model = timm.create_model("test_resnet", num_classes=4)
    opt = build_optimizer(load_config("digits", {"opt": "sgd", "lr": 0.1, "opt_kwargs": {"nesterov": True}}), model)
    assert all(g["nesterov"] for g in opt.param_groups)


def test_sync_bn_on_cpu_workers_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match="--dist-bn reduce"):
        resolve_scaling(cfg_with(sync_bn=True), {"CPU": 2.0})
    assert resolve_scaling(cfg_with(sync_bn=True), {"CPU": 8.0, "GPU": 2.0}) == (True, 2)


def test_a_timm_args_yaml_loads(tmp_path, capsys):
    """A timm train.py args.yaml (flat keys, torchrun-only keys among them) is a valid config here."""
    (tmp_path / "args.yaml").write_text(
        "data: null\ndata_dir: null\ndataset: sklearn/digits\nmodel: resnet10t\nlr: 0.05\nepochs: 3\n"
        "batch_size: 32\nsmoothing: 0.1\nmixup: 0.2\ncutmix: 1.0\nmodel_ema: true\nclip_mode: agc\nclip_grad: 0.01\n"
        "local_rank: 0\ndevice: cuda\ndistributed: false\nworld_size: 1\nrank: 0\nprefetcher: true\n"
        "no_prefetcher: false\nchannels_last: false\namp: true\namp_dtype: bfloat16\n")
    cfg = load_config(str(tmp_path / "args.yaml"))
    assert cfg.model.model == "resnet10t" and cfg.optim.clip_mode == "agc" and cfg.aug.cutmix == 1.0
    assert "ignoring timm key 'local_rank'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(str(tmp_path / "args.yaml"), {"jsd_loss_typo": True})
