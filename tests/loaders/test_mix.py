"""MixBatchDataset: stratified counts exact per batch (and over time), multinomial statistics, rank slices,
exhaustion and repeat without losing tails, batch_mix_fn helpers, sample weights."""

from __future__ import annotations

import math
import runpy
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from prep.errors import PrepError
from prep.loaders import (
    DataLoader,
    MixBatchDataset,
    SequenceDataset,
    Source,
    concat_pad,
    homogeneous_concat_mix,
)
from prep.loaders.combinators.blend import exact_weights
from prep.loaders.combinators.mix import spread, stratified_counts
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
    def build() -> MixBatchDataset:
        return MixBatchDataset(
            (seq("a", 40), 3), (seq("b", 40), 1), batch_size=4, counts="stratified", world_size=2
        )

    mix = build()
    mix.bind("")
    for _ in range(5):
        desc = mix.next_batch()
        parts = [mix.fetch(desc, r, 2) for r in range(2)]
        keys = [k for p in parts for k in p["__key__"]]
        assert len(keys) == 8 and len(set(keys)) == 8
        for p in parts:
            n_a = sum(k.startswith("a") for k in p["__key__"])
            assert abs(n_a - 3) <= 1  # contiguous slices of an evenly spread batch
        whole = mix.fetch(desc, 0, 1)  # elastic: one rank loads the same global batch
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
