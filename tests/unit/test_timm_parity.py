"""timm train.py options that change behaviour inside the loop, each shown to do so (not only to parse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from raytrain_cls.core.config import Config, ConfigError, load_config
from raytrain_cls.core.model import build_model, compile_model
from raytrain_cls.core.optim import build_optimizer
from raytrain_cls.run.driver import resolve_scaling

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
    assert resolve_scaling(cfg_with(sync_bn=True), {"CPU": 8.0, "GPU": 2.0})[:2] == (True, 2)


def test_a_timm_args_yaml_loads(tmp_path, capsys):
    """A timm train.py args.yaml (flat keys, torchrun-only keys among them) is a valid config here."""
    (tmp_path / "args.yaml").write_text(
        "data: null\ndata_dir: null\ndataset: sklearn/digits\nmodel: resnet10t\nlr: 0.05\nepochs: 3\n"
        "batch_size: 32\nsmoothing: 0.1\nmixup: 0.2\ncutmix: 1.0\nmodel_ema: true\nclip_mode: agc\nclip_grad: 0.01\n"
        "local_rank: 0\ndevice: cuda\ndistributed: false\nworld_size: 1\nrank: 0\nprefetcher: true\n"
        "no_prefetcher: false\nchannels_last: false\namp: true\namp_dtype: bfloat16\n"
    )
    cfg = load_config(str(tmp_path / "args.yaml"))
    assert cfg.model.model == "resnet10t" and cfg.optim.clip_mode == "agc" and cfg.aug.cutmix == 1.0
    assert "ignoring timm key 'local_rank'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(str(tmp_path / "args.yaml"), {"jsd_loss_typo": True})


TIMM_ARGS = Path(__file__).parents[1] / "data" / "timm_args.yaml"


def test_timms_own_args_yaml_with_every_key_loads_with_timms_values(capsys):
    """All of timm train.py's keys at their defaults: each one is a config field with timm's value, a
    torchrun-only key ignored with a note, or a feature we lack (accepted only while it is off)."""
    import yaml

    raw = yaml.safe_load(TIMM_ARGS.read_text())
    cfg = load_config(str(TIMM_ARGS), {"data_dir": "/data/imagenet"})
    ours = cfg.flat()
    differ = {
        k: (v, ours[k])
        for k, v in raw.items()
        if k in ours and k != "data_dir" and v != ours[k] and not (v in (None, "") and ours[k] in (None, ""))
    }
    assert not differ, differ
    assert cfg.model.model == "resnet50" and cfg.sched.epochs == 300 and cfg.optim.lr is None
    assert "ignoring timm key 'local_rank'" in capsys.readouterr().err


TIMM_MAIN_ARGS = Path(__file__).parents[1] / "data" / "timm_main_args.yaml"  # main's train.py, every key


def test_the_main_branch_args_yaml_with_every_key_at_its_default_loads(capsys):
    """timm's main branch writes keys this project does not know (or not yet build): at their defaults they are
    accepted with a note, and every key both know keeps timm's value."""
    import yaml

    raw = yaml.safe_load(TIMM_MAIN_ARGS.read_text())
    cfg = load_config(str(TIMM_MAIN_ARGS), {"data_dir": "/data/imagenet"}).validate()
    ours = cfg.flat()
    differ = {
        k: (v, ours[k])
        for k, v in raw.items()
        if k in ours and k != "data_dir" and v != ours[k] and not (v in (None, "") and ours[k] in (None, ""))
    }
    assert not differ, differ
    assert cfg.loss.kd_loss_type == "kl" and cfg.data.naflex_patchify_channels_first is False
    assert {"train_img_sizes", "train_size_schedule", "variable_batch_loss_scale"} <= set(raw)


def test_a_main_branch_args_yaml_with_a_scheduled_resolution_recipe_loads_with_its_values(tmp_path):
    import yaml

    recipe = {
        "train_img_sizes": [160, 192, 224],
        "train_batch_sizes": [256, 192, 128],
        "train_size_probs": [1.0, 1.0, 2.0],
        "train_size_schedule": "progressive",
        "train_size_schedule_spread": 0.5,
        "train_size_random_mix": 0.2,
        "train_batches_per_epoch": 1000,
        "variable_batch_loss_scale": "sqrt",
    }
    raw = {**yaml.safe_load(TIMM_MAIN_ARGS.read_text()), **recipe, "data_dir": "/data"}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "args.yaml")).validate()
    assert {k: cfg.get(k) for k in recipe} == recipe


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("kd_loss_type", "mse", "must be one of \\['kl'\\]"),
        ("train_size_schedule", "progressive", "a scheduled-resolution option: it needs --train-img-sizes"),
        ("variable_batch_loss_scale", "sqrt", "a scheduled-resolution option: it needs --train-img-sizes"),
        ("train_batches_per_epoch", 100, "a scheduled-resolution option: it needs --train-img-sizes"),
        ("a_flag_from_the_future", True, "unknown key .*a newer timm"),
        ("a_width_from_the_future", 3, "unknown key .*set it to its default or drop it"),
    ],
)
def test_an_args_yaml_switching_on_what_we_lack_fails_by_name(tmp_path, key, value, words):
    import yaml

    raw = {**yaml.safe_load(TIMM_MAIN_ARGS.read_text()), key: value, "data_dir": "/data"}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"{key} = .*{words}"):
        load_config(str(tmp_path / "args.yaml")).validate()


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_an_unknown_key_that_is_off_passes_with_a_note(value, capsys):
    cfg = Config().update({"a_flag_from_the_future": value, "dataset": "digits"}).validate()
    assert cfg.data.dataset == "digits"
    assert "ignoring unknown key 'a_flag_from_the_future'" in capsys.readouterr().err


def test_a_grouped_config_still_refuses_an_unknown_key_whatever_its_value():
    with pytest.raises(ConfigError, match="optim.lrr .*unknown key"):
        Config().update({"optim": {"lrr": None}})


def test_naflex_patches_channels_first_needs_the_naflex_loader():
    with pytest.raises(ConfigError, match="naflex_patchify_channels_first .*needs --naflex-loader"):
        Config().update({"dataset": "digits", "naflex_patchify_channels_first": True}).validate()


def test_naflex_patches_channels_first_are_the_channels_last_ones_reordered():
    """--naflex-patchify-channels-first reaches timm's Patchify in the training collate and the validation
    transform: the same pixels, each patch flattened (C, P, P) instead of (P, P, C)."""
    from PIL import Image

    from raytrain_cls.data.naflex import naflex_eval_transform

    data_config = dict(input_size=[3, 32, 32], interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    last = naflex_eval_transform(data_config, 8, 16)(img)["patches"]
    first = naflex_eval_transform(data_config, 8, 16, channels_first=True)(img)["patches"]
    n = last.shape[0]
    assert torch.equal(first, last.reshape(n, 8, 8, 3).permute(0, 3, 1, 2).reshape(n, -1))


def test_an_args_yaml_with_the_naflex_loader_on_loads_its_settings(tmp_path):
    import yaml

    raw = {
        **yaml.safe_load(TIMM_ARGS.read_text()),
        "naflex_loader": True,
        "naflex_max_seq_len": 256,
        "naflex_loss_scale": "sqrt",
        "data_dir": "/data",
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "args.yaml"))
    assert cfg.data.naflex_loader and cfg.data.naflex_max_seq_len == 256 and cfg.data.naflex_loss_scale == "sqrt"
    assert cfg.data.naflex_train_seq_lens == [128, 256, 576, 784, 1024]  # timm's default, as written


def test_drop_connect_is_timms_old_name_for_drop_path():
    assert cfg_with(drop_connect=0.1).model.drop_path == 0.1
    assert cfg_with(drop_connect=None, drop_path=0.2).model.drop_path == 0.2


# ---- loss, head init, fast norm, torchscript, epoch repeats, save-images ---------------------------------------
def test_bce_sum_and_pos_weight_change_the_loss():
    from raytrain_cls.core.loss import build_train_loss

    torch.manual_seed(0)
    logits, target = torch.randn(4, 10), torch.tensor([0, 3, 5, 9])
    plain = build_train_loss(cfg_with(bce_loss=True, smoothing=0.0))(logits, target)
    summed = build_train_loss(cfg_with(bce_loss=True, smoothing=0.0, bce_sum=True))(logits, target)
    weighted = build_train_loss(cfg_with(bce_loss=True, smoothing=0.0, bce_pos_weight=5.0))(logits, target)
    assert torch.allclose(summed, plain * 10)  # summed over the 10 classes instead of averaged
    assert weighted > plain
    with pytest.raises(ConfigError, match="loss.bce_pos_weight"):
        cfg_with(bce_pos_weight=0.0).validate()


def test_head_init_scale_and_bias_reach_the_classifier():
    torch.manual_seed(3)
    ref = build_model(cfg_with(), 10, CPU).get_classifier()
    torch.manual_seed(3)
    head = build_model(cfg_with(head_init_scale=0.01, head_init_bias=-2.0), 10, CPU).get_classifier()
    assert torch.allclose(head.weight, ref.weight * 0.01)
    assert torch.equal(head.bias, torch.full((10,), -2.0))


def test_fast_norm_switches_timm_norm_layers():
    from timm.layers import set_fast_norm

    try:
        model = build_model(load_config("digits", {"model": "test_vit", "fast_norm": True}), 10, CPU)
        norms = [m for m in model.modules() if hasattr(m, "_fast_norm")]
        assert norms and all(m._fast_norm for m in norms)
    finally:
        set_fast_norm(False)
    model = build_model(load_config("digits", {"model": "test_vit"}), 10, CPU)
    assert not any(m._fast_norm for m in model.modules() if hasattr(m, "_fast_norm"))


def test_torchscript_model_trains_and_refuses_what_timm_refuses():
    torch.manual_seed(0)
    model = build_model(load_config("digits", {"model": "test_resnet", "torchscript": True}), 10, CPU)
    assert isinstance(model, torch.jit.ScriptModule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    before = torch.nn.functional.cross_entropy(model(x), y)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.nn.functional.cross_entropy(model(x), y) < before
    for clash in ({"torchcompile": "inductor"}, {"grad_checkpointing": True}):
        with pytest.raises(ConfigError, match="cannot be combined with --torchscript"):
            cfg_with(torchscript=True, **clash).validate()


def test_fuser_selects_torchscripts_fuser_and_refuses_a_removed_one():
    """--fuser old switches TorchScript's tensor-expression fuser off (process-wide, as timm does); nvfuser is
    refused on a PyTorch where setting it is a silent no-op."""
    from timm.utils import set_jit_fuser

    assert torch._C._jit_texpr_fuser_enabled()
    cpu_fusion = torch._C._jit_can_fuse_on_cpu()
    try:
        model = build_model(
            load_config("digits", {"model": "test_resnet", "torchscript": True, "fuser": "old"}), 10, CPU
        )
        assert isinstance(model, torch.jit.ScriptModule) and not torch._C._jit_texpr_fuser_enabled()
    finally:
        set_jit_fuser("te")  # back to torch's default fuser for the rest of this process
        torch._C._jit_override_can_fuse_on_cpu(cpu_fusion)
    assert torch._C._jit_texpr_fuser_enabled()
    with pytest.raises(ConfigError, match="model.fuser.*no nvfuser"):
        cfg_with(fuser="nvfuser").validate()


def test_epoch_repeats_make_longer_epochs_of_fresh_shuffles():
    from collections import Counter

    from raytrain_cls.data.sampler import ResumableDistributedSampler

    s = ResumableDistributedSampler(10, 0, 1, seed=1, repeats=2.5)
    s.set_epoch(3)
    order = list(s)
    assert len(s) == len(order) == 25
    counts = Counter(order)
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two full passes, then half of a third
    assert order[:10] != order[10:20]  # each pass its own shuffle
    assert len(ResumableDistributedSampler(10, 0, 1, seed=1)) == 10
    two = [ResumableDistributedSampler(10, r, 2, seed=1, repeats=2.5) for r in range(2)]
    for t in two:
        t.set_epoch(3, consumed=6)
    # resumed after 6 samples on 2 ranks: exactly the 19 left, plus one pad slot (the epoch's first sample)
    assert Counter(list(two[0]) + list(two[1])) == Counter(order[6:]) + Counter(order[:1])


def test_save_images_writes_the_logged_batches(tmp_path):
    from PIL import Image

    from raytrain_cls.core.engine import TrainParts, autocast_factory, train_one_epoch
    from raytrain_cls.run.worker import save_batch_images

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    parts = TrainParts(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
    )
    loader = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])) for _ in range(4)]
    train_one_epoch(
        2, loader, parts, 0, log_interval=2, log=lambda m: None, on_log_batch=save_batch_images(str(tmp_path))
    )
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == ["train-0002-000002.jpg", "train-0002-000004.jpg"]
    with Image.open(tmp_path / "images" / files[0]) as img:
        assert img.size == (4 * 8, 8)  # torchvision's grid: 4 images in a row, no padding


def test_val_interval_evaluates_every_nth_epoch_and_the_last():
    from raytrain_cls.run.report import epoch_line
    from raytrain_cls.run.worker import evaluates

    assert [e for e in range(10) if evaluates(e, 3, 10)] == [2, 5, 8, 9]
    assert [e for e in range(4) if evaluates(e, 1, 4)] == [0, 1, 2, 3]
    line = epoch_line(dict(epoch=0, train_loss=1.0, lr=0.1, img_per_sec=10.0), 10)
    assert line.startswith("Epoch 0/9: train_loss 1.0000") and "not evaluated" in line


def test_model_dtype_bfloat16_trains_and_evaluates_in_bf16():
    from raytrain_cls.core.engine import TrainParts, autocast_factory, evaluate, train_one_epoch
    from raytrain_cls.core.model import model_dtype

    cfg = cfg_with(model="test_resnet", model_dtype="bfloat16")
    torch.manual_seed(0)
    model = build_model(cfg, 4, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    parts = TrainParts(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        loss_fn=torch.nn.CrossEntropyLoss(),
        device=CPU,
        autocast=autocast_factory(CPU, False, torch.float32),
        input_dtype=model_dtype(cfg),
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 4) for _ in range(6)]
    before = evaluate(model, data, CPU, parts.autocast)["loss"]  # float32 batches: cast to the weights' dtype
    for epoch in range(3):
        train_one_epoch(epoch, data, parts, 0)
    assert evaluate(model, data, CPU, parts.autocast)["loss"] < before
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="precision.model_dtype"):
        cfg_with(model_dtype="bfloat16", amp=True).validate()
    with pytest.raises(ConfigError, match="float16 weights need GPUs"):
        resolve_scaling(cfg_with(model_dtype="float16").validate(), {"CPU": 4})


def test_2024_augmentations_reach_timms_transform_and_change_the_output():
    from PIL import Image

    from raytrain_cls.data.transforms import build_transform

    dc = {
        "input_size": [3, 32, 32],
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    grey = build_transform(cfg_with(grayscale_prob=1.0, color_jitter=0.0), dc, True)
    x = grey(img)
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])  # every channel the same: grey
    text = repr(
        build_transform(cfg_with(gaussian_blur_prob=0.3, color_jitter_prob=0.5, train_crop_mode="rkrc"), dc, True)
    )
    assert "GaussianBlur" in text and "p=0.3" in text and "RandomApply" in text and "ResizeKeepRatio" in text
    assert "GaussianBlur" not in repr(build_transform(cfg_with(), dc, True))  # off by default, as in timm
    with pytest.raises(ConfigError, match="aug.grayscale_prob"):
        Config().update({"dataset": "synthetic", "gpu_decode": True, "grayscale_prob": 0.2}).validate()


def test_layer_decay_min_scale_and_no_opt_scale():
    model = build_model(load_config("digits", {"model": "test_vit"}), 10, CPU)
    floor = build_optimizer(cfg_with(model="test_vit", layer_decay=0.5, layer_decay_min_scale=0.2), model)
    assert min(g["lr_scale"] for g in floor.param_groups) == pytest.approx(0.2)
    plain = build_optimizer(cfg_with(model="test_vit", layer_decay=0.5), model)
    assert min(g["lr_scale"] for g in plain.param_groups) < 0.2
    frozen = build_optimizer(cfg_with(model="test_vit", layer_decay=0.5, layer_decay_no_opt_scale=0.3), model)
    optimized = sum(p.numel() for g in frozen.param_groups for p in g["params"])
    assert optimized < sum(p.numel() for g in plain.param_groups for p in g["params"])


def test_the_training_collate_lays_out_patches_as_asked():
    from raytrain_cls.data.naflex import NaFlexTrainCollate

    assert [p.channels_last for p in NaFlexTrainCollate([8, 16], None, 0, channels_first=True).patchify] == [False] * 2
    assert [p.channels_last for p in NaFlexTrainCollate([8], None, 0).patchify] == [True]
