"""MixBatchDataset: stratified counts exact per batch (and over time), multinomial statistics, rank slices,
exhaustion and repeat without losing tails, batch_mix_fn helpers, sample weights; the interleave
computed by windows (the same as the whole batch's, uniform, a rank's share, O(window) tree nodes) and
the refusal of states saved by the planner before it."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import runpy
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prep.errors import PrepError
from prep.loaders import (
    DataLoader,
    MixBatchDataset,
    SequenceDataset,
    Source,
    concat_pad,
    homogeneous_concat_mix,
)
from prep.loaders.base import counter_rng, fingerprint_hash, slice_refs
from prep.loaders.combinators.blend import exact_weights
from prep.loaders.combinators.mix import (
    LEAF_POSITIONS,
    PLANNER,
    shuffled_window,
    spread,
    spread_window,
    stratified_counts,
)
from prep.testing.loader_data import keyed_sequence

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def seq(name: str, n: int, seed: int = 0, **extra: object) -> SequenceDataset:
    return keyed_sequence(name, n, 1, seed, **extra)


def planned_counts(mix: MixBatchDataset, batches: int) -> list[list[int]]:
    mix.bind("")
    return [mix.next_batch().info["mix_counts"] for _ in range(batches)]


@pytest.mark.parametrize(
    "weights,batch",
    [
        ([6, 4], 32),
        ([1, 2], 6),
        ([1, 1, 1], 10),
        ([0.5, 0.3, 0.2], 7),
        ([5, 2, 1], 3),
        ([0.13, 0.29, 0.58], 64),
    ],
)
def test_stratified_counts_are_exact_every_batch_and_over_time(weights: list[float], batch: int) -> None:
    mix = MixBatchDataset(
        *[(seq(str(i), 50, seed=i), w) for i, w in enumerate(weights)],
        batch_size=batch,
        counts="stratified",
        world_size=1,
    )
    exact = exact_weights(weights)
    totals = [0] * len(weights)
    for g, counts in enumerate(planned_counts(mix, 200), start=1):
        assert sum(counts) == batch
        for i, (c, w) in enumerate(zip(counts, exact, strict=True)):
            assert math.floor(batch * w) <= c <= math.ceil(batch * w), (g, counts)
            totals[i] += c
            assert math.floor(g * batch * w) <= totals[i] <= math.ceil(g * batch * w), (g, totals)


def test_fixed_tie_break_would_drift_but_stratified_does_not() -> None:
    """0.6/0.4 at 32 is 19.2/12.8: a fixed largest remainder gives 19/13 forever (59.4%)."""
    counts = [
        c[0]
        for c in planned_counts(
            MixBatchDataset(
                (seq("a", 99), 0.6), (seq("b", 99), 0.4), batch_size=32, counts="stratified", world_size=1
            ),
            50,
        )
    ]
    assert set(counts) == {19, 20}
    assert sum(counts) == round(50 * 32 * 0.6)


def test_multinomial_counts_vary_but_match_weights_on_average() -> None:
    mix = MixBatchDataset((seq("a", 30), 1), (seq("b", 30, seed=1), 2), batch_size=6, seed=3, world_size=1)
    first = [c[0] for c in planned_counts(mix, 3000)]
    assert len(set(first)) >= 5  # energon's behaviour: 0..6 of 6 at 1:2
    p, n = 1 / 3, 3000 * 6
    assert abs(sum(first) / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_stratified_helpers_directly() -> None:
    w = [Fraction(1, 3), Fraction(2, 3)]
    assert stratified_counts(w, 3, [0, 0], 0) == [1, 2]
    labels = spread([4, 2, 2])
    assert Counter(labels) == {0: 4, 1: 2, 2: 2}
    assert labels[:4].count(0) == 2  # interleaved, not grouped


@pytest.mark.parametrize("counts", [[4, 2, 2], [1, 0, 7], [13, 5], [3, 3, 3, 1], [40, 1, 17, 9]])
def test_spread_keeps_every_window_within_two_of_its_share(counts: list[int]) -> None:
    labels = np.asarray(spread(counts))
    n = len(labels)
    assert np.bincount(labels, minlength=len(counts)).tolist() == counts
    for i, c in enumerate(counts):
        cum = np.concatenate([[0], np.cumsum(labels == i)])
        for a in range(n):
            dev = (cum[a + 1 :] - cum[a]) - np.arange(1, n - a + 1) * c / n
            assert np.abs(dev).max() < 2


def test_each_rank_gets_its_share_and_ranks_are_disjoint() -> None:
    def build(world: int) -> MixBatchDataset:
        mix = MixBatchDataset(
            (seq("a", 40), 3), (seq("b", 40), 1), batch_size=8 // world, counts="stratified", world_size=world
        )
        mix.bind("")
        return mix

    mix, on_one = build(2), build(1)
    for _ in range(5):
        desc = mix.next_batch()
        parts = [mix.fetch(desc, r, 2) for r in range(2)]
        keys = [k for p in parts for k in p["__key__"]]
        assert len(keys) == 8 and len(set(keys)) == 8
        for p in parts:
            n_a = sum(k.startswith("a") for k in p["__key__"])
            assert abs(n_a - 3) <= 1  # contiguous slices of an evenly spread batch
        whole = on_one.fetch(on_one.next_batch(), 0, 1)  # elastic: one rank plans the same global batch
        assert whole["__key__"] == keys


def test_finite_sources_without_repeat_give_every_sample_once_then_end() -> None:
    mix = MixBatchDataset(
        (seq("a", 23), 1), (seq("b", 11), 1), batch_size=4, counts="stratified", repeat=False, world_size=1
    )
    loader = DataLoader(mix, rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == sorted([f"a{i}" for i in range(23)] + [f"b{i}" for i in range(11)])
    assert [b for b in loader]  # the next epoch starts again
    assert mix.epoch == 2


def test_repeat_continues_a_small_source_without_losing_its_tail() -> None:
    small = seq("s", 5)
    mix = MixBatchDataset((small, 1), (seq("b", 100), 1), batch_size=4, counts="stratified", world_size=1)
    mix.bind("")
    refs = [ref for _ in range(10) for i, ref in mix.next_batch().items if i == 0]
    assert len(refs) == 20
    assert sorted(refs[:5]) == list(range(5)) and sorted(refs[5:10]) == list(
        range(5)
    )  # whole epochs, in turn


@pytest.mark.parametrize("counts", ["stratified", "multinomial"])
def test_set_epoch_on_an_endless_mix_lets_its_sources_go_on(counts: str) -> None:
    """A trainer's `loader.set_epoch(e)` with a fixed number of steps per epoch over an endless mix: the
    sources go on (a large one's samples never repeat before its epoch ends; a small one shows a new
    epoch's order each time). set_epoch restarted every source at epoch e: the small source's earlier
    epochs came back (two mix epochs in a row showed it in the same order) and most of the large one's
    samples were never seen."""
    mix = MixBatchDataset((seq("a", 6), 1), (seq("b", 100), 1), batch_size=4, counts=counts, world_size=1)
    loader = DataLoader(mix, rank=0, world_size=1)
    per_epoch: list[list[str]] = []
    for e in range(4):
        loader.set_epoch(e)
        per_epoch.append([k for _, b in zip(range(6), loader, strict=False) for k in b["__key__"]])
    large = [k for keys in per_epoch for k in keys if k[0] == "b"]
    assert len(large) == len(set(large)) > 30
    small = [[k for k in keys if k[0] == "a"] for keys in per_epoch]
    assert all(a != b for a, b in itertools.pairwise(small))
    assert mix.state_dict()["children"][1]["epoch"] == 0  # 100 samples: still in its first epoch


def test_source_smaller_than_its_share_cycles_inside_a_batch_with_repeat() -> None:
    mix = MixBatchDataset(
        (seq("s", 2), 1), (seq("b", 50), 1), batch_size=8, counts="stratified", world_size=1
    )
    mix.bind("")
    refs = [ref for i, ref in mix.next_batch().items if i == 0]
    assert sorted(refs) == [0, 0, 1, 1]


def test_concat_pad_and_homogeneous_concat_mix() -> None:
    a, b = torch.ones(1, 2, 3), torch.full((2, 4, 1), 2.0)
    out = concat_pad([a, b])
    assert out.shape == (3, 4, 3)
    assert out[0, :2, :3].eq(1).all() and out[0, 2:].eq(0).all() and out[1:, :, 0].eq(2).all()
    assert out[1:, :, 1:].eq(0).all()
    assert concat_pad([np.ones((1, 2)), np.ones((1, 3))]).shape == (2, 3)
    mixed = homogeneous_concat_mix([{"x": a, "t": ["p"]}, {"x": b, "t": ["q", "r"]}])
    assert mixed["t"] == ["p", "q", "r"] and mixed["x"].shape == (3, 4, 3)
    with pytest.raises(PrepError, match="different fields"):
        homogeneous_concat_mix([{"x": a}, {"y": a}])
    with pytest.raises(PrepError, match="different types"):
        homogeneous_concat_mix([{"x": a}, [a]])
    with pytest.raises(PrepError, match="ranks"):
        concat_pad([torch.ones(1, 2), torch.ones(1, 2, 2)])


def test_sources_that_list_the_same_fields_in_another_order_concatenate() -> None:
    """Samples with the same fields in another order (shards written by other tools order members
    differently) are concatenated field by field; they raised 'different fields: ['x', 'y'] vs ['x', 'y']'."""
    first, second = {"x": torch.ones(1, 2), "t": ["p"]}, {"t": ["q"], "x": torch.zeros(1, 2)}
    mixed = homogeneous_concat_mix([first, second])
    assert list(mixed) == ["x", "t"] and mixed["t"] == ["p", "q"] and mixed["x"].tolist() == [[1, 1], [0, 0]]


@pytest.mark.parametrize("dtypes", [(torch.int64, torch.float32), (torch.float16, torch.float32),
                                    (torch.uint8, torch.int16), (torch.float32, torch.float64)])
def test_concat_pad_keeps_every_sources_values_in_the_promoted_type(dtypes: tuple) -> None:
    """Samples of two dtypes (fp16 latents from one source, fp32 from another; int and float labels)
    concatenate in the type torch.cat promotes to; they were all cast to the first one's (0.5 -> 0,
    0.1234567 -> 0.1235 in fp16)."""
    values = [torch.tensor([[1, 2]]).to(dtypes[0]), torch.tensor([[0.1234567, -300.5]]).to(dtypes[1])]
    for parts in (values, values[::-1]):
        out = concat_pad(parts)
        assert out.dtype == torch.cat(parts).dtype and torch.equal(out, torch.cat(parts))


def test_default_mix_collates_padded_batches_with_sources_and_weights() -> None:
    small = SequenceDataset(
        [{"__key__": f"s{i}", "img": torch.ones(3, 4, 4)} for i in range(8)], 1, world_size=1
    )
    large = SequenceDataset(
        [{"__key__": f"l{i}", "img": torch.ones(3, 6, 5)} for i in range(8)], 1, world_size=1
    )
    mix = MixBatchDataset(
        Source(small, 1, name="small", sample_weight=3.0),
        Source(large, 1, name="large"),
        batch_size=4,
        counts="stratified",
        world_size=1,
    )
    batch = next(iter(DataLoader(mix, rank=0, world_size=1)))
    assert batch["img"].shape == (4, 3, 6, 5)
    assert sorted(batch["__source__"]) == ["large", "large", "small", "small"]
    for s, w in zip(batch["__source__"], batch["__weight__"].tolist(), strict=True):
        assert w == (3.0 if s == "small" else 1.0)


def test_batch_level_map_cannot_be_mixed() -> None:
    from prep.loaders import MapDataset

    mix = MixBatchDataset((MapDataset(seq("a", 8), lambda b: b), 1), batch_size=2, world_size=1)
    mix.bind("")
    with pytest.raises(PrepError, match="per_sample=True"):
        mix.fetch(mix.next_batch(), 0, 1)


def test_bad_arguments() -> None:
    with pytest.raises(PrepError, match="multinomial or stratified"):
        MixBatchDataset((seq("a", 4), 1), batch_size=2, counts="exact", world_size=1)
    with pytest.raises(PrepError, match="batch_size"):
        MixBatchDataset((seq("a", 4), 1), batch_size=0, world_size=1)


def test_heterogeneous_mix_example_runs() -> None:
    seen = runpy.run_path(str(EXAMPLES / "heterogeneous_mix.py"), run_name="not_main")["main"](steps=2)
    assert all(s["text_only"] == 4 and s["images"][0] == 12 for s in seen)


def test_final_tail_shorter_than_the_world_is_dropped() -> None:
    def leaf(name: str, n: int) -> SequenceDataset:
        return SequenceDataset([{"__key__": f"{name}{i}"} for i in range(n)], 1, world_size=2)

    mix = MixBatchDataset(
        (leaf("a", 6), 1), (leaf("b", 3), 1), batch_size=2, counts="stratified", repeat=False, world_size=2
    )
    mix.bind("")
    sizes = []
    with pytest.raises(StopIteration):
        while True:
            sizes.append(len(mix.next_batch().items))
    assert sizes == [4, 4] and mix.epoch == 1  # 9 samples: two batches of 4, the last one dropped


# ------------------------------------------------------------------------------ windows of a batch
def _rng(v: int) -> np.random.Generator:
    return counter_rng(0, "", "mix-order", 0, 0, v)


@given(
    st.lists(st.integers(0, 700), min_size=1, max_size=4).filter(lambda c: sum(c) > 0),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_a_window_is_that_part_of_the_whole_arrangement(counts: list[int], x: float, y: float) -> None:
    n = sum(counts)
    lo, hi = sorted((int(x * n), int(y * n)))
    windows = (lambda a, b: shuffled_window(counts, a, b, _rng), lambda a, b: spread_window(counts, a, b))
    for window in windows:
        _, whole = window(0, n)
        assert np.bincount(whole, minlength=len(counts)).tolist() == counts
        before, labels = window(lo, hi)
        assert labels == whole[lo:hi]
        assert before == np.bincount(np.asarray(whole[:lo], dtype=np.int64), minlength=len(counts)).tolist()
    assert spread_window(counts, 0, n)[1] == spread(counts)


def test_a_window_draws_only_the_tree_nodes_it_overlaps() -> None:
    """A rank's slice of a 2**20 batch costs O(log n) draws, not O(n): the two root-to-leaf paths."""
    drawn: list[int] = []

    def rng(v: int) -> np.random.Generator:
        drawn.append(v)
        return _rng(v)

    n = 2**20
    _, labels = shuffled_window([n // 2, n // 3, n - n // 2 - n // 3], 700_000, 700_032, rng)
    assert len(labels) == 32
    assert len(drawn) <= 2 * (math.log2(n / LEAF_POSITIONS) + 1)


def _batches(counts: str, world: int, per_rank: int, batches: int, weights=(1, 2, 1)):
    """(descriptor, each source's count) of `batches` planned batches of a mix of in-memory sources."""
    mix = MixBatchDataset(*[(seq(str(i), 5000, seed=i), w) for i, w in enumerate(weights)],
                          batch_size=per_rank, counts=counts, seed=11, world_size=world)
    mix.bind("")
    return mix, [mix.next_batch() for _ in range(batches)]


def test_random_interleave_is_uniform_over_positions_and_ranks_get_their_share() -> None:
    world, per_rank = 64, 32
    n = world * per_rank  # 2,048 positions: 8 tree leaves
    _, descs = _batches("multinomial", world, per_rank, 150)
    labels = np.asarray([[i for i, _ in d.items] for d in descs])
    # each source spread evenly over 16 buckets of positions (chi-square, 15 dof, p = 0.001: 37.70)
    for i in range(3):
        hist = (labels == i).reshape(len(descs), 16, -1).sum(axis=(0, 2))
        expected = hist.sum() / 16
        assert float(((hist - expected) ** 2 / expected).sum()) < 37.70, (i, hist.tolist())
    # a rank's count of source 1 is hypergeometric around its share: z-scores of mean 0 and variance 1
    c = (labels == 1).sum(axis=1, keepdims=True)
    got = (labels == 1).reshape(len(descs), world, per_rank).sum(axis=2)
    p = c / n
    z = (got - per_rank * p) / np.sqrt(per_rank * p * (1 - p) * (n - per_rank) / (n - 1))
    assert abs(z.mean()) < 0.05 and abs(z.var() - 1) < 0.1, (z.mean(), z.var())


def test_stratified_rank_slices_hold_their_share_within_two_and_a_worker_computes_them() -> None:
    world, per_rank = 64, 7
    mix, descs = _batches("stratified", world, per_rank, 10, weights=(0.5, 0.3, 0.2))
    n = world * per_rank
    for d in descs:
        whole = list(d.items)
        sent = pickle.loads(pickle.dumps(d))  # what a worker gets: counts and ranges, no tree
        for rank in range(world):
            part = slice_refs(mix, sent.items, rank, world)
            assert part == whole[rank * per_rank : (rank + 1) * per_rank]
            for i, c in enumerate(d.info["mix_counts"]):
                assert abs(sum(s == i for s, _ in part) - per_rank * c / n) < 2
    with pytest.raises(PrepError, match="no node"):
        pickle.loads(pickle.dumps(descs[0])).items[0]


def test_a_state_saved_by_the_planner_before_windows_is_refused_in_one_line() -> None:
    def loader(counts: str) -> DataLoader:
        mix = MixBatchDataset((seq("a", 40), 1), (seq("b", 40, seed=1), 2), batch_size=4, counts=counts,
                              seed=2, world_size=1)
        return DataLoader(mix, rank=0, world_size=1)

    dl = loader("multinomial")
    next(iter(dl))
    state = json.loads(json.dumps(dl.state_dict()))
    assert state["fingerprint_doc"]["planner"] == PLANNER
    del state["fingerprint_doc"]["planner"]  # what the older planner saved
    state["fingerprint"] = fingerprint_hash(state["fingerprint_doc"])
    with pytest.raises(PrepError) as err:
        loader("multinomial").load_state_dict(state)
    msg = str(err.value)
    assert "\n" not in msg and f'planner: (absent) -> "{PLANNER}"' in msg and "prep version" in msg
    # the stratified stream is unchanged by windows, so its fingerprint carries no marker
    assert "planner" not in loader("stratified").state_dict()["fingerprint_doc"]
