"""The global sample order: a bijection per epoch, seeded, independent of the world size."""

import pytest
from hypothesis import given, settings, strategies as st

from orchestrator.data.order import EpochPermutation, GlobalOrder, rank_slice


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_each_epoch_is_a_permutation_of_every_sample(n):
    perm = EpochPermutation(n, seed=5, epoch=0)
    assert sorted(perm[i] for i in range(n)) == list(range(n))


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**63), epoch=st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_any_size_seed_and_epoch_gives_a_bijection(n, seed, epoch):
    perm = EpochPermutation(n, seed, epoch)
    assert len({perm[i] for i in range(n)}) == n
    assert all(0 <= perm[i] < n for i in range(n))


def test_the_order_is_fixed_by_seed_and_epoch_and_shuffles():
    a = [EpochPermutation(500, 1, 0)[i] for i in range(500)]
    assert a == [EpochPermutation(500, 1, 0)[i] for i in range(500)]
    assert a != [EpochPermutation(500, 2, 0)[i] for i in range(500)]
    assert a != [EpochPermutation(500, 1, 1)[i] for i in range(500)]
    assert a != sorted(a)
    # Well mixed: few samples stay near their place.
    assert sum(abs(x - i) < 10 for i, x in enumerate(a)) < 25


def test_positions_past_an_epoch_continue_in_the_next_epochs_order():
    order = GlobalOrder(num_samples=10, seed=3)
    assert order.epoch_of(23) == (2, 3)
    assert order.sample_at(23) == EpochPermutation(10, 3, 2)[3]
    # A batch that straddles the boundary: the end of epoch 0, the start of epoch 1.
    ids = order.rank_samples(8, 4, 0, 1)
    assert ids == [EpochPermutation(10, 3, 0)[8], EpochPermutation(10, 3, 0)[9],
                   EpochPermutation(10, 3, 1)[0], EpochPermutation(10, 3, 1)[1]]


@pytest.mark.parametrize("position", [0, 12, 96, 1000])
def test_the_union_of_a_step_over_ranks_is_the_same_at_every_world_size(position):
    order = GlobalOrder(num_samples=97, seed=0)
    batch = 12

    def union(world):
        return [s for r in range(world) for s in order.rank_samples(position, batch, r, world)]

    assert union(1) == union(2) == union(3) == union(4) == union(6) == union(12)


def test_a_batch_that_does_not_split_evenly_names_the_setting():
    with pytest.raises(ValueError, match="batch_size=10 .* divisible by the number of workers, 4"):
        rank_slice(0, 10, 0, 4)
