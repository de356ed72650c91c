"""raytrain_cls.data.sampler: worker-count-independent training order, exact resume, exact validation shards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from raytrain_cls.data.sampler import ResumableDistributedSampler, ShardSampler, epoch_order


def ranks(n: int, world: int, seed: int = 0, epoch: int = 0, consumed: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, rank, world, seed=seed)
        s.set_epoch(epoch, consumed)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,world", [(20, 1), (20, 4), (23, 4), (10, 3), (7, 2)])
def test_ranks_cover_the_data_with_minimal_padding(n, world):
    """Every sample is dealt at least once; the ceil(n/world)*world - n padded slots repeat distinct samples
    from the start of the epoch's order; all ranks get the same count (DDP needs equal step counts)."""
    parts = ranks(n, world, seed=3, epoch=1)
    per_rank = -(-n // world)
    assert all(len(p) == per_rank for p in parts)
    counts = Counter(i for p in parts for i in p)
    assert set(counts) == set(range(n))
    pad = per_rank * world - n
    repeated = sorted(i for i, c in counts.items() if c == 2)
    assert max(counts.values()) <= 2 and len(repeated) == pad
    assert repeated == sorted(epoch_order(n, 3, 1)[:pad].tolist())


def test_ranks_are_disjoint_without_padding():
    parts = ranks(24, 4, seed=1, epoch=2)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 24


def test_round_robin_over_one_global_order():
    """Rank r takes positions r, r + world, ... of the epoch's global order, so the k-th samples of all ranks
    form one contiguous block of it, whatever the world size."""
    order = epoch_order(24, 5, 0).tolist()
    for world in (1, 2, 3, 4):
        parts = ranks(24, world, seed=5)
        interleaved = [parts[r][k] for k in range(len(parts[0])) for r in range(world)]
        assert interleaved == order


def test_same_seed_and_epoch_same_order():
    assert ranks(50, 2, seed=7, epoch=3) == ranks(50, 2, seed=7, epoch=3)


def test_order_changes_with_epoch_and_seed():
    base = ranks(50, 1, seed=7, epoch=3)[0]
    assert ranks(50, 1, seed=7, epoch=4)[0] != base
    assert ranks(50, 1, seed=8, epoch=3)[0] != base
    assert sorted(base) == list(range(50))  # still a permutation


def test_order_does_not_depend_on_global_torch_rng():
    s = ResumableDistributedSampler(30, 0, 1, seed=2)
    torch.manual_seed(0)
    first = list(s)
    torch.manual_seed(123)
    assert list(s) == first


def test_no_shuffle_is_identity():
    s = ResumableDistributedSampler(10, 1, 2, shuffle=False)
    assert list(s) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("consumed", [0, 1, 6, 11, 12])
def test_resume_yields_exactly_the_remainder(world, consumed):
    """After ``set_epoch(epoch, consumed)`` the ranks together deal exactly the global order from position
    ``consumed`` on (plus the usual padding at the end), for any world size."""
    n, seed, epoch = 12, 4, 2
    order = epoch_order(n, seed, epoch).tolist()
    parts = ranks(n, world, seed=seed, epoch=epoch, consumed=consumed)
    per_rank = -(-(n - consumed) // world)
    assert all(len(p) == per_rank for p in parts)
    interleaved = [parts[r][k] for k in range(per_rank) for r in range(world)]
    assert interleaved[: n - consumed] == order[consumed:]
    assert interleaved[n - consumed :] == order[: per_rank * world - (n - consumed)]


def test_resume_across_world_sizes():
    """Two workers stopped after 3 steps of batch 2 (12 samples consumed); one worker resumes with the rest."""
    n, seed, epoch, batch = 30, 9, 1, 2
    before = ranks(n, 2, seed=seed, epoch=epoch)
    seen = {i for p in before for i in p[: 3 * batch]}
    after = ranks(n, 1, seed=seed, epoch=epoch, consumed=2 * 3 * batch)[0]
    assert seen.isdisjoint(after) and seen | set(after) == set(range(n))


def test_len_matches_iteration_and_state_dict():
    s = ResumableDistributedSampler(11, 2, 3, seed=1)
    s.set_epoch(4, 2)
    assert len(s) == len(list(s)) == 3
    assert s.state_dict() == {"epoch": 4, "consumed": 2, "seed": 1}
    s.set_epoch(5)  # a new epoch starts from the beginning
    assert s.consumed == 0 and len(s) == 4


def test_rank_outside_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        ResumableDistributedSampler(10, 2, 2)


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 4), (2, 3), (0, 2)])
def test_shard_sampler_covers_validation_exactly_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # no padding, no duplicates
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    assert shards[0] == list(range(0, n, world))


# ---- timm's --aug-repeats -------------------------------------------------------------------------------------
def tagged(n: int, world: int, aug_repeats: int, consumed: int = 0) -> list[list[tuple[int, int]]]:
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, rank, world, seed=4, aug_repeats=aug_repeats)
        s.set_epoch(2, consumed)
        out.append(s.tagged())
    return out


def test_aug_repeats_deal_each_sample_to_as_many_ranks_as_copies():
    """As timm's RepeatAugSampler: with 3 copies over 3 ranks every rank sees the same samples, each rank its own
    copy; the epoch keeps its length, made of a third as many distinct samples."""
    parts = tagged(30, 3, aug_repeats=3)
    assert [len(p) for p in parts] == [10, 10, 10]
    assert [i for i, _ in parts[0]] == [i for i, _ in parts[1]] == [i for i, _ in parts[2]]
    assert [{c for _, c in p} for p in parts] == [{0}, {1}, {2}]
    counts = Counter(i for p in parts for i, _ in p)
    assert len(counts) == 10 and set(counts.values()) == {3}
    assert [i for i, _ in parts[0]] == epoch_order(30, 4, 2)[:10].tolist()


def test_aug_repeats_on_one_rank_put_the_copies_side_by_side():
    (one,) = tagged(12, 1, aug_repeats=2)
    assert len(one) == 12
    assert [c for _, c in one] == [0, 1] * 6
    assert all(one[k][0] == one[k + 1][0] for k in range(0, 12, 2))


def test_aug_repeats_resume_continues_with_the_unseen_copies():
    """Position-based like every order here: stopping after k global samples and resuming (on another worker
    count) yields exactly the (sample, copy) pairs not yet seen."""
    full = [tagged(30, 1, 3)[0][k] for k in range(30)]
    after = tagged(30, 3, 3, consumed=12)
    interleaved = [after[r][k] for k in range(len(after[0])) for r in range(3)]
    assert interleaved == full[12:]
    assert tagged(30, 1, 0)[0] == [(i, 0) for i in ranks(30, 1, seed=4, epoch=2)[0]]  # off: the plain order
