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
    train_ids = [i for i, _ in loaders.train.sampler]
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
