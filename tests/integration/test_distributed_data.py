"""Two real Ray Train workers (gloo) each read a disjoint share of the training data and exactly their share of
the validation data, through the same build_source/build_loaders calls the production worker makes."""

import sys

import pytest
from records import resolved_record

from raytrain_cls.core.config import load_config

pytestmark = pytest.mark.integration


def _on_two_ranks(config: dict) -> dict:
    """Both checks in one Ray Train run (a run costs ~13 s of Ray start-up here): the sample ids each rank's
    loaders hand out, and the metrics of the same untrained model evaluated over the ranks' validation shares."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raytrain_cls.core.config import Config
    from raytrain_cls.core.engine import autocast_factory, evaluate
    from raytrain_cls.core.model import build_model
    from raytrain_cls.data import build_loaders, build_source

    cfg = Config.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved.data_config, rank, world)
    loaders.set_epoch(0)
    train_ids = [key[0] for key in loaders.train.sampler]  # keys: (index, epoch, copy)
    val_ids = list(loaders.val.sampler)
    batches = sum(1 for _ in loaders.train)  # the loader really iterates (transforms run) on each worker
    shares = [None] * world
    dist.all_gather_object(shares, dict(train=train_ids, val=val_ids, batches=batches))
    torch.manual_seed(0)  # the same (untrained, so often wrong) model on every rank
    model = build_model(cfg, 10, torch.device("cpu"))
    metrics = evaluate(model, loaders.val, torch.device("cpu"), autocast_factory(torch.device("cpu"), False, None))
    return dict(shares=shares, metrics=metrics)  # rank 0's return value reaches the driver as result.return_value


def digits_config():
    cfg = load_config("digits", {"workers": 0, "batch_size": 32, "model": "test_resnet"})
    data_config = dict(resolved_record().data_config, input_size=[3, 32, 32], interpolation="bicubic")
    cfg.resolved = resolved_record(num_workers=2, train_samples=1438, val_samples=359, data_config=data_config)
    return cfg


@pytest.fixture(scope="module")
def two_ranks(ray_local, tmp_path_factory):
    import ray.cloudpickle
    import ray.train

    from raytrain_cls.run.ray_trainer import RunTrainer  # as runs fit: without the placement-group cleaner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    try:
        trainer = RunTrainer(
            _on_two_ranks,
            train_loop_config=digits_config().to_dict(),
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
            run_config=ray.train.RunConfig(name="two-ranks", storage_path=str(tmp_path_factory.mktemp("ranks"))),
        )
        return trainer.fit().return_value
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_two_workers_see_disjoint_shares(two_ranks):
    shares = two_ranks["shares"]
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


def test_top1_over_two_ranks_equals_one_rank_on_an_odd_validation_set(two_ranks):
    """359 validation images split 180/179: exact metrics, no sample padded in or counted twice."""
    import torch

    from raytrain_cls.core.engine import autocast_factory, evaluate
    from raytrain_cls.core.model import build_model
    from raytrain_cls.data import build_loaders, build_source

    cfg = digits_config()
    two = two_ranks["metrics"]
    loaders = build_loaders(cfg, build_source(cfg), cfg.resolved.data_config, 0, 1)
    torch.manual_seed(0)
    model = build_model(cfg, 10, torch.device("cpu"))
    one = evaluate(model, loaders.val, torch.device("cpu"), autocast_factory(torch.device("cpu"), False, None))
    assert one["samples"] == two["samples"] == 359
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
