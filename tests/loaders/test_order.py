"""The epoch order: a bijection, seekable anywhere, windowed, deterministic, epoch-dependent."""

import numpy as np
import pytest

from prep.loaders.base import batches_per_epoch
from prep.loaders.order import _BLOCK, EpochOrder, shard_order, window_permutation


def _all(order: EpochOrder, epoch: int) -> list[tuple[int, int]]:
    shards, samples = order.lookup(epoch, 0, order.total)
    return list(zip(shards.tolist(), samples.tolist(), strict=True))


@pytest.mark.parametrize("window", [1, 2, 3, 100])
def test_every_sample_exactly_once_per_epoch(window):
    counts = [5, 0, 7, 1, 9, 3]
    order = EpochOrder(counts, seed=4, window_shards=window)
    for epoch in range(3):
        got = _all(order, epoch)
        assert sorted(got) == [(i, j) for i, n in enumerate(counts) for j in range(n)]


def test_any_range_equals_the_slice_of_the_whole_epoch():
    order = EpochOrder([11, 4, 9, 13, 2], seed=1, window_shards=2)
    whole = _all(order, 5)
    fresh = EpochOrder([11, 4, 9, 13, 2], seed=1, window_shards=2)  # no cache shared with `order`
    for start, stop in [(0, 3), (10, 30), (38, 39), (17, 17), (0, 39)]:
        s, j = fresh.lookup(5, start, stop)
        assert list(zip(s.tolist(), j.tolist(), strict=True)) == whole[start:stop]


def _defined(counts: list[int], seed: int, window: int, epoch: int) -> list[tuple[int, int]]:
    """The order as the module docstring defines it, position by position: shards shuffled, windows of
    `window` shards, each window's samples permuted together. A state saved by any prep resumes into it."""
    order = shard_order(len(counts), seed, "", epoch, True).tolist()
    out: list[tuple[int, int]] = []
    for w in range(0, len(order), window):
        members = [(i, j) for i in order[w : w + window] for j in range(counts[i])]
        perm = window_permutation(len(members), seed, "", epoch, w // window)
        out += [members[p] for p in perm.tolist()]
    return out


def test_lookups_across_blocks_and_windows_follow_the_definition():
    counts = [3000, 0, 5000, 2500, 7000, 1]  # windows of several resolution blocks
    assert max(counts) > _BLOCK
    whole = _defined(counts, 7, 2, 3)
    rng = np.random.default_rng(0)
    order = EpochOrder(counts, seed=7, window_shards=2)
    assert _all(order, 3) == whole
    for _ in range(200):
        start = int(rng.integers(0, len(whole)))
        stop = min(len(whole), start + int(rng.choice([1, 31, 32, _BLOCK, 3 * _BLOCK])))
        s, j = order.lookup(3, start, stop)
        assert list(zip(s.tolist(), j.tolist(), strict=True)) == whole[start:stop]


def test_windows_keep_samples_of_a_window_together():
    counts = [4] * 6
    order = EpochOrder(counts, seed=2, window_shards=2)
    got = _all(order, 0)
    windows = [{s for s, _ in got[i : i + 8]} for i in range(0, 24, 8)]
    assert all(len(w) == 2 for w in windows)  # each block of 8 positions draws from exactly 2 shards
    assert set().union(*windows) == set(range(6))


def test_deterministic_and_different_across_epochs_seeds_and_paths():
    a = _all(EpochOrder([50, 50], seed=0), 0)
    assert a == _all(EpochOrder([50, 50], seed=0), 0)
    assert a != _all(EpochOrder([50, 50], seed=0), 1)
    assert a != _all(EpochOrder([50, 50], seed=1), 0)
    assert a != _all(EpochOrder([50, 50], seed=0, path="0/1"), 0)


def test_unshuffled_is_storage_order():
    order = EpochOrder([2, 3], seed=9, shuffle=False)
    assert _all(order, 7) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert shard_order(4, 9, "", 3, False).tolist() == [0, 1, 2, 3]


def test_out_of_range_lookup_is_refused():
    with pytest.raises(IndexError):
        EpochOrder([3], seed=0).lookup(0, 2, 4)


def test_batches_per_epoch_policy():
    assert batches_per_epoch(10, 4, drop_last=False) == 3
    assert batches_per_epoch(10, 4, drop_last=True) == 2
    assert batches_per_epoch(8, 4, drop_last=False) == 2


def test_shard_order_is_a_permutation():
    perm = shard_order(1000, 3, "x", 2, True)
    assert np.array_equal(np.sort(perm), np.arange(1000))
    assert not np.array_equal(perm, np.arange(1000))
