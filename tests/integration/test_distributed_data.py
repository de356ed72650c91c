"""Two real Ray Train workers (gloo) each read a disjoint share of the training data and exactly their share of
the validation data, through the same build_source/build_loaders calls the production worker makes."""
import pytest

from raytrain_cls.config import load_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _ship_this_module_by_value():
    """Ray workers cannot import a pytest test module; send its functions by value instead."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _record_indices(config: dict) -> list:
    import ray.train
    import torch.distributed as dist

    from raytrain_cls.config import Config
    from raytrain_cls.data import build_loaders, build_source

    cfg = Config.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved["data_config"], rank, world)
    loaders.set_epoch(0)
    train_ids = [key[0] for key in loaders.train.sampler]  # keys: (index, epoch, copy)
    val_ids = list(loaders.val.sampler)
    batches = sum(1 for _ in loaders.train)  # the loader really iterates (transforms run) on each worker
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(train=train_ids, val=val_ids, batches=batches))
    return gathered  # Ray hands rank 0's return value to the driver as result.return_value


def test_two_workers_see_disjoint_shares(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = load_config("digits", {"workers": 0, "batch_size": 32})
    cfg.resolved = dict(data_config=dict(input_size=[3, 32, 32], interpolation="bicubic", mean=[0.5] * 3,
                                         std=[0.5] * 3, crop_pct=1.0, crop_mode="center"))
    trainer = TorchTrainer(_record_indices, train_loop_config=cfg.to_dict(),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=ray.train.RunConfig(name="shares", storage_path=str(tmp_path)))
    shares = trainer.fit().return_value
    assert len(shares) == 2
    a, b = (set(s["train"]) for s in shares)
    num_train = len(load_source_sizes()[0])
    assert a and b and not a & b, "the two ranks trained on overlapping samples"
    assert len(a) == len(b) == num_train // 2  # the global order padded to even, then split: no sample lost
    assert a | b == set(range(num_train))
    assert shares[0]["batches"] == shares[1]["batches"] == (num_train // 2) // 32  # drop_last, same step count
    va, vb = (set(s["val"]) for s in shares)
    num_val = len(load_source_sizes()[1])
    assert not va & vb and va | vb == set(range(num_val))  # validation: every sample exactly once


def load_source_sizes():
    from raytrain_cls.data import build_source

    src = build_source(load_config("digits"))
    return src.train, src.val


def _evaluate_on_ranks(config: dict) -> dict:
    import ray.train
    import torch

    from raytrain_cls.config import Config
    from raytrain_cls.data import build_loaders, build_source
    from raytrain_cls.engine import autocast_factory, evaluate
    from raytrain_cls.model import build_model

    cfg = Config.from_dict(config)
    ctx = ray.train.get_context()
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved["data_config"], ctx.get_world_rank(),
                            ctx.get_world_size())
    torch.manual_seed(0)  # the same (untrained, so often wrong) model on every rank
    model = build_model(cfg, 10, torch.device("cpu"))
    return evaluate(model, loaders.val, torch.device("cpu"), autocast_factory(torch.device("cpu"), False, None))


def test_top1_over_two_ranks_equals_one_rank_on_an_odd_validation_set(ray_local, tmp_path):
    """359 validation images split 180/179: exact metrics, no sample padded in or counted twice."""
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from raytrain_cls.data import build_loaders, build_source
    from raytrain_cls.engine import autocast_factory, evaluate
    from raytrain_cls.model import build_model

    cfg = load_config("digits", {"workers": 0, "model": "test_resnet"})
    cfg.resolved = dict(data_config=dict(input_size=[3, 32, 32], interpolation="bicubic", mean=[0.5] * 3,
                                         std=[0.5] * 3, crop_pct=1.0, crop_mode="center"))
    two = TorchTrainer(_evaluate_on_ranks, train_loop_config=cfg.to_dict(),
                       scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                       run_config=ray.train.RunConfig(name="eval2", storage_path=str(tmp_path))).fit().return_value
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved["data_config"], 0, 1)
    torch.manual_seed(0)
    model = build_model(cfg, 10, torch.device("cpu"))
    one = evaluate(model, loaders.val, torch.device("cpu"), autocast_factory(torch.device("cpu"), False, None))
    assert one["samples"] == two["samples"] == 359
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
