"""Sampling: which images a run trains and tests on and which form each batch, pure functions of (seed, epoch)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lean.sampling import aspect_groups, epoch_batches, repeat_factors, repeated_indices, split_indices
from tests.strategies import image_sizes


@given(image_sizes, st.integers(1, 5), st.integers(0, 100), st.integers(0, 5))
def test_every_image_exactly_once_per_epoch(sizes, batch_size, seed, epoch):
    groups = aspect_groups(sizes)
    batches = epoch_batches(groups, np.arange(len(sizes)), batch_size, seed, epoch)
    seen = [index for batch in batches for index in batch]
    assert sorted(seen) == list(range(len(sizes)))
    assert all(len(batch) == batch_size for batch in batches[:-1]) and 0 < len(batches[-1]) <= batch_size


@given(image_sizes, st.integers(1, 4), st.integers(2, 4), st.booleans())
def test_rank_shards_are_equal_disjoint_and_cover(sizes, batch_size, world_size, drop_last):
    groups, indices = aspect_groups(sizes), np.arange(len(sizes))
    shards = [
        epoch_batches(groups, indices, batch_size, 0, 1, rank, world_size, drop_last) for rank in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1  # every rank takes the same number of steps
    seen = [index for shard in shards for batch in shard for index in batch]
    if drop_last:
        assert len(seen) == len(set(seen))  # disjoint; the tail that does not divide evenly is left out
    else:
        assert set(seen) == set(range(len(sizes)))  # covering, with fewer than world_size repeats to even out
        assert len(seen) - len(set(seen)) < world_size
        if len(sizes) % world_size == 0:
            assert len(seen) == len(set(seen))


@given(image_sizes, st.integers(2, 4), st.integers(0, 50))
def test_batches_stay_within_an_aspect_group_but_for_the_leftovers(sizes, batch_size, seed):
    groups = aspect_groups(sizes)
    batches = epoch_batches(groups, np.arange(len(sizes)), batch_size, seed, 0)
    counts = np.bincount(groups)
    leftover_batches = -(-int((counts % batch_size).sum()) // batch_size)
    # every batch but those made at the end from the groups' remainders is of one aspect group
    assert all(len({groups[i] for i in batch}) == 1 for batch in batches[: len(batches) - leftover_batches])
    assert leftover_batches <= -(-int((counts > 0).sum()) * (batch_size - 1) // batch_size)


def test_aspect_groups_follow_the_ratio():
    groups = aspect_groups([(100, 400), (100, 100), (400, 100), (101, 99)])
    assert groups[0] < groups[1] < groups[2] and groups[1] == groups[3]


def test_tutorial_split_is_120_train_50_test_and_seeded():
    train, test = split_indices(170, seed=0)
    assert len(train) == 120 and len(test) == 50
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(170))
    assert np.array_equal(split_indices(170, seed=0)[1], test)
    assert not np.array_equal(split_indices(170, seed=1)[1], test)
    small_train, small_test = split_indices(20, seed=0)
    assert len(small_test) == 4 and len(small_train) == 16
    with pytest.raises(ValueError):
        split_indices(10, test_size=10)


def test_repeat_factors_are_lvis_ones_from_the_rarest_class_of_each_image():
    labels = [[1]] * 8 + [[1, 2], [3, 3]]  # class 1 in 9 of 10 images, classes 2 and 3 in one each
    factors = repeat_factors(labels, threshold=0.4)
    assert np.allclose(factors[:8], 1.0)  # sqrt(0.4 / 0.9) < 1
    assert np.allclose(factors[8:], np.sqrt(0.4 / 0.1))  # an image takes its rarest class's factor
    assert repeat_factors([[], [1]], 0.5)[0] == 1.0  # an image with no instance comes once


@given(st.lists(st.floats(1.0, 4.0), min_size=1, max_size=40), st.integers(0, 50), st.integers(0, 9))
def test_each_epoch_takes_every_image_about_its_factor_times_and_keeps_its_length(factors, seed, epoch):
    indices = np.arange(100, 100 + len(factors))
    taken = repeated_indices(indices, factors, seed, epoch)
    counts = np.array([(taken == index).sum() for index in indices])
    length = int(np.ceil(sum(factors) - 1e-9))
    scaled = np.array(factors) * length / sum(factors)
    assert np.all(counts >= np.floor(scaled)) and np.all(counts <= np.ceil(scaled)) and np.all(counts >= 1)
    assert len(taken) == length == len(repeated_indices(indices, factors, seed, epoch + 1))
    assert np.array_equal(taken, repeated_indices(indices, factors, seed, epoch))  # a pure function


def test_over_many_epochs_an_image_comes_as_often_as_its_factor_says():
    factors = np.array([1.0, 1.5, 2.25, 3.0])
    taken = np.concatenate([repeated_indices(np.arange(4), factors, 0, epoch) for epoch in range(4000)])
    assert np.allclose(np.bincount(taken) / 4000, factors * 8 / 7.75, atol=0.04)  # 4 standard deviations
