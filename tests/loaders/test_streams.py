"""Every random stream of the loaders is independent of its neighbours.

For each stream (window permutations and shard order, SequenceDataset, LocalDataset and its buckets,
ChunkedSampler passes, mix counts and interleaving; the blend schedule is in test_blend.py):
- between successive epochs (passes, batches) the rank correlation of sample positions is |rho| < 0.05;
- the sample pairs that share a batch in both epochs are no more than independent orders give (a
  binomial expectation, 5 standard deviations);
- over 1,000 seeds the position of one sample is uniform (chi-square, 10 bins, p > 0.001).
Statistics are computed with numpy; sizes are the smallest where |rho| < 0.05 is > 4 standard deviations.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from prep.loaders import ChunkedSampler, LocalDataset, MixBatchDataset, SequenceDataset
from prep.loaders.base import counter_rng, stream_key
from prep.loaders.order import EpochOrder

N = 8000  # samples: the sd of rho under independence is 1/sqrt(N) = 0.011
CHI2_9DOF_P001 = 27.877  # chi-square critical value, 9 degrees of freedom, p = 0.001
CHI2_1DOF_P001 = 10.828


def rho(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; on positions (ranks without ties) it is Spearman's rank correlation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def positions(order: np.ndarray) -> np.ndarray:
    """pos[s] = where sample s sits in the order."""
    pos = np.empty(len(order), dtype=np.int64)
    pos[np.asarray(order)] = np.arange(len(order))
    return pos


def co_batched_pairs(batch_a: np.ndarray, batch_b: np.ndarray) -> int:
    """Pairs of samples that share a batch under both labellings (batch_x[s] = batch of sample s)."""
    _, counts = np.unique(np.stack([batch_a, batch_b]), axis=1, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def pairs_in(batch: np.ndarray) -> int:
    counts = np.bincount(batch)
    return int((counts * (counts - 1) // 2).sum())


def assert_batches_independent(batch_a: np.ndarray, batch_b: np.ndarray, group: np.ndarray | None = None):
    """Pairs co-batched in both epochs stay within the binomial expectation of independent orders: a pair
    together in epoch a meets again in b with p = (pairs b puts together) / (pairs that could meet), per
    group (a bucketed order only batches samples of one bucket)."""
    group = np.zeros(len(batch_a), dtype=np.int64) if group is None else np.asarray(group)
    expected = var = 0.0
    for g in np.unique(group):
        sel = group == g
        n = int(sel.sum())
        if n < 2:
            continue
        pa, pb = pairs_in(batch_a[sel]), pairs_in(batch_b[sel])
        p = pb / (n * (n - 1) / 2)
        expected += pa * p
        var += pa * p * (1 - p)
    got = co_batched_pairs(batch_a, batch_b)
    assert got <= expected + 5 * max(var, 1.0) ** 0.5, (got, expected, var**0.5)


def assert_orders_independent(order_a, order_b, batch: int, group=None):
    pos_a, pos_b = positions(order_a), positions(order_b)
    r = rho(pos_a, pos_b)
    assert abs(r) < 0.05, r
    assert_batches_independent(pos_a // batch, pos_b // batch, group)


def assert_uniform_position(pos: list[int], n: int):
    """Positions (one per seed) spread evenly over 10 bins of [0, n)."""
    hist = np.bincount(np.asarray(pos) * 10 // n, minlength=10)
    expected = len(pos) / 10
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_9DOF_P001, (chi2, hist.tolist())


def test_the_statistics_catch_a_shifted_stream():
    """The check that guards every stream: an order one block of draws away from the last (what counters
    in Philox's counter gave) fails it; two independent ones pass."""
    n = N
    a = np.random.Generator(np.random.Philox(key=7, counter=[0, 0, 0, 0])).permutation(n)
    b = np.random.Generator(np.random.Philox(key=7, counter=[1, 0, 0, 0])).permutation(n)
    with pytest.raises(AssertionError):
        assert_orders_independent(a, b, 32)
    a, b = (counter_rng(7, "", "x", e).permutation(n) for e in (0, 1))
    assert_orders_independent(a, b, 32)


def test_counter_rng_and_stream_key_hash_every_input():
    draws = {
        (seed, path, purpose, c): float(counter_rng(seed, path, purpose, *c).random())
        for seed in (0, 1)
        for path in ("", "0", "0/1")
        for purpose in ("a", "b")
        for c in ((), (0,), (1,), (0, 1), (1, 0))
    }
    assert len(set(draws.values())) == len(draws)
    assert stream_key(0, "k", "crop", 1) != stream_key(0, "k", "crop", 2) != stream_key(1, "k", "crop", 2)
    assert counter_rng(3, "p", "x", 5).random() == counter_rng(3, "p", "x", 5).random()  # pure


# ------------------------------------------------------------------------------------ shard order
def _epoch_order(counts, seed, epoch, window_shards=16) -> np.ndarray:
    order = EpochOrder(counts, seed=seed, window_shards=window_shards)
    shards, samples = order.lookup(epoch, 0, order.total)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return starts[shards] + samples


@pytest.mark.parametrize("counts", [[N], [1] * N], ids=["one-shard window", "one-sample shards"])
def test_shard_order_successive_epochs_are_independent(counts):
    for e in (0, 1):
        assert_orders_independent(_epoch_order(counts, 5, e), _epoch_order(counts, 5, e + 1), 32)


def test_shard_order_batches_of_many_shards_are_independent():
    """32 shards in windows of 16: samples at the same offsets no longer meet in the same batches. (Rank
    correlation is not asserted here: with 32 shards, shard-level chance alone has an sd of 0.18.)"""
    counts = [250] * 32
    for e in (0, 1):
        a, b = positions(_epoch_order(counts, 5, e)), positions(_epoch_order(counts, 5, e + 1))
        assert_batches_independent(a // 32, b // 32)


def test_shard_order_successive_windows_are_independent():
    """Two windows of one epoch are permuted by independent streams (same sizes, so comparable)."""
    order = EpochOrder([N // 2, N // 2], seed=3, window_shards=1)
    _, a = order.lookup(0, 0, N // 2)
    _, b = order.lookup(0, N // 2, N)
    assert abs(rho(positions(a), positions(b))) < 0.05


def test_shard_order_first_sample_is_uniform_over_seeds():
    n = 500
    assert_uniform_position([int(positions(_epoch_order([n], s, 0))[0]) for s in range(1000)], n)
    shard_pos = [int(positions(_epoch_order([10] * 50, s, 0, window_shards=4))[0]) for s in range(1000)]
    assert_uniform_position(shard_pos, 500)  # with shard order and windows in play too


# -------------------------------------------------------------------------------- SequenceDataset
def _seq_order(ds: SequenceDataset, epoch: int) -> np.ndarray:
    ds.set_epoch(epoch)
    out: list[int] = []
    while True:
        try:
            out += ds.next_batch().items
        except StopIteration:
            return np.asarray(out)


def test_sequence_successive_epochs_are_independent():
    ds = SequenceDataset(list(range(N)), 32, shuffle=True, seed=1, world_size=1)
    orders = [_seq_order(ds, e) for e in range(3)]
    for a, b in itertools.pairwise(orders):
        assert_orders_independent(a, b, 32)


def test_sequence_first_sample_is_uniform_over_seeds():
    n = 200
    items = list(range(n))
    pos = [int(positions(_seq_order(SequenceDataset(items, 8, shuffle=True, seed=s, world_size=1), 0))[0])
           for s in range(1000)]
    assert_uniform_position(pos, n)


# ----------------------------------------------------------------------------------- LocalDataset
def _image_folder(root, n: int):
    """n tiny PNGs of several aspect ratios (so buckets hold several groups) and their captions."""
    root.mkdir()
    blobs = []
    for w, h in ((8, 8), (16, 8), (8, 16), (12, 8)):
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    lines = []
    for i in range(n):
        (root / f"{i:05d}.png").write_bytes(blobs[i % len(blobs)])
        lines.append(f"{i:05d}.png\tcaption {i}\n")
    caps = root / "captions.txt"
    caps.write_text("".join(lines))
    return root, caps


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("local") / "imgs", N)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("local_small") / "imgs", 100)


def _local_plan(ds: LocalDataset, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows in planned order, batch index of each row) of one epoch."""
    ds.set_epoch(epoch)
    rows: list[int] = []
    batch: list[int] = []
    b = 0
    while True:
        try:
            items = ds.next_batch().items
        except StopIteration:
            return np.asarray(rows), np.asarray(batch)
        rows += [r for r, _, _ in items]
        batch += [b] * len(items)
        b += 1


@pytest.mark.slow  # writes 8,000 image files once (~2-6 s)
@pytest.mark.parametrize("buckets", [None, True], ids=["plain", "buckets"])
def test_local_successive_epochs_are_independent(big_folder, buckets):
    imgs, caps = big_folder
    ds = LocalDataset(imgs, caps, batch_size=32, seed=2, buckets=buckets, image_size=64, world_size=1, rank=0)
    (ra, ba), (rb, bb) = _local_plan(ds, 0), _local_plan(ds, 1)
    pos_a, pos_b = positions(ra), positions(rb)
    assert abs(rho(pos_a, pos_b)) < 0.05
    batch_a, batch_b = np.empty(N, np.int64), np.empty(N, np.int64)
    batch_a[ra], batch_b[rb] = ba, bb
    assert_batches_independent(batch_a, batch_b, ds.bucket_of)


@pytest.mark.slow  # 1,000 datasets, each reading 100 image headers for its buckets (~4 s)
@pytest.mark.parametrize("buckets", [None, True], ids=["plain", "buckets"])
def test_local_first_sample_is_uniform_over_seeds(small_folder, buckets):
    imgs, caps = small_folder
    pos = []
    for s in range(1000):
        ds = LocalDataset(imgs, caps, batch_size=4, seed=s, buckets=buckets, image_size=64, world_size=1,
                          rank=0)
        pos.append(int(positions(_local_plan(ds, 0)[0])[0]))
    assert_uniform_position(pos, 100)


# ---------------------------------------------------------------------------------- ChunkedSampler
def test_chunked_successive_passes_are_independent():
    s = ChunkedSampler(N, 100, seed=4, rank=0, world_size=1)
    for p in (0, 1):
        assert_orders_independent(s.permutation(p), s.permutation(p + 1), 100)


def test_chunked_first_sample_is_uniform_over_seeds():
    n = 200
    pos = [int(positions(ChunkedSampler(n, 20, seed=s, rank=0, world_size=1).permutation(0))[0])
           for s in range(1000)]
    assert_uniform_position(pos, n)


# ------------------------------------------------------------------------------------------- mix
def _mix(seed: int = 0, batch: int = 8) -> MixBatchDataset:
    a = SequenceDataset(list(range(64)), 1, shuffle=True, seed=1, world_size=1)
    b = SequenceDataset(list(range(64)), 1, shuffle=True, seed=2, world_size=1)
    return MixBatchDataset((a, 1), (b, 1), batch_size=batch, seed=seed, world_size=1)


def _mix_epoch(mix: MixBatchDataset, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(count of source 0 per batch, source labels of every position) over n batches of `epoch`."""
    mix.set_epoch(epoch)
    counts, labels = [], []
    for _ in range(n):
        d = mix.next_batch()
        counts.append(d.info["mix_counts"][0])
        labels += [i for i, _ in d.items]
    return np.asarray(counts), np.asarray(labels)


def test_mix_counts_and_interleaving_are_independent_between_epochs_and_batches():
    mix = _mix()
    (ca, la), (cb, lb) = _mix_epoch(mix, 0, 5000), _mix_epoch(mix, 1, 5000)
    assert abs(rho(ca, cb)) < 0.05  # batch g's counts in epoch 0 vs epoch 1
    assert abs(rho(ca[:-1], ca[1:])) < 0.05  # batch g vs g+1
    assert abs(rho(la, lb)) < 0.05  # which source sits at each position, epoch 0 vs 1
    assert abs(ca.mean() - 4) < 0.1  # and the counts follow the weights


def test_mix_first_position_is_fair_over_seeds():
    first = np.asarray([_mix(seed=s).next_batch().items[0][0] for s in range(1000)])
    chi2 = float(((np.bincount(first, minlength=2) - 500) ** 2 / 500).sum())
    assert chi2 < CHI2_1DOF_P001, np.bincount(first)


# ------------------------------------------------------------------------------------ random crops
def test_random_crop_positions_are_independent_between_epochs():
    from prep.loaders.io.decode import Decoder
    from prep.loaders.io.images import crop_box

    dec = Decoder.make("uint8", 16, "random", None, seed=3)
    keys = [f"k{i:05d}" for i in range(N)]
    tops = [np.asarray([crop_box(400, 16, 16, 16, "random", dec._rnd(k, e))[0] for k in keys])
            for e in (0, 1)]
    assert abs(rho(tops[0], tops[1])) < 0.05
    assert_uniform_position(tops[0].tolist(), 385)  # 385 possible tops, spread evenly
