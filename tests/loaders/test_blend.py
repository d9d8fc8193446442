"""BlendDataset: proportions (random: statistical bounds; smooth: exact floor/ceil), per-source batch
sizes, energon's exhaustion rule, repeat, sample weights, and the errors users meet."""

from __future__ import annotations

import math
import runpy
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from prep.errors import PrepError
from prep.loaders import BlendDataset, DataLoader, SequenceDataset, Source
from prep.loaders.blend import exact_weights, smooth_pick
from prep.testing.loader_data import keyed_sequence as seq

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def plan(blend: BlendDataset, n: int) -> list[int]:
    """The sources of the next n planned batches (planning only: nothing is loaded)."""
    blend.bind("")
    return [blend.next_batch().items[0] for _ in range(n)]


def test_random_schedule_proportions_within_statistical_bounds() -> None:
    n = 4000
    for weights in ([0.7, 0.3], [5, 2, 1]):
        blend = BlendDataset(
            *[(seq(str(i), 10, 2, seed=i), w) for i, w in enumerate(weights)], seed=11, repeat=True
        )
        counts = Counter(plan(blend, n))
        for i, w in enumerate(weights):
            p = w / sum(weights)
            sigma = math.sqrt(p * (1 - p) / n)
            assert abs(counts[i] / n - p) < 5 * sigma, (weights, i, counts)


def test_random_choice_is_a_function_of_seed_and_batch_index() -> None:
    def build(seed: int) -> BlendDataset:
        return BlendDataset((seq("a", 10, 2), 1), (seq("b", 10, 2), 1), seed=seed, repeat=True)

    assert plan(build(3), 200) == plan(build(3), 200)
    assert plan(build(3), 200) != plan(build(4), 200)
    # batch g's choice does not depend on how the blend got there: jump straight to g = 150
    full = plan(build(3), 200)
    jumped = build(3)
    jumped.bind("")
    jumped.load_state_dict({**jumped.state_dict(), "g": 150})
    assert [jumped.next_batch().items[0] for _ in range(50)] == full[150:]


@pytest.mark.parametrize(
    "weights",
    [
        [1, 1],
        [0.6, 0.4],
        [5, 2, 1],
        [0.1, 0.2, 0.3, 0.4],
        [1 / 3, 1 / 7, 0.5],
        [97, 1, 2],
        [0.123, 0.456, 0.789, 0.012, 0.3],
    ],
)
def test_smooth_schedule_keeps_every_source_within_floor_and_ceil(weights: list[float]) -> None:
    blend = BlendDataset(
        *[(seq(str(i), 10, 2, seed=i), w) for i, w in enumerate(weights)], schedule="smooth", repeat=True
    )
    exact = exact_weights(weights)
    counts = [0] * len(weights)
    for g, i in enumerate(plan(blend, 500), start=1):
        counts[i] += 1
        for c, w in zip(counts, exact, strict=True):
            assert math.floor(g * w) <= c <= math.ceil(g * w), (weights, g, counts)


def test_smooth_pick_never_picks_a_zero_weight() -> None:
    weights = [Fraction(0), Fraction(1, 3), Fraction(2, 3)]
    counts = [0, 0, 0]
    for _ in range(30):
        counts[smooth_pick(weights, counts)] += 1
    assert counts == [0, 10, 20]


def test_sources_keep_their_own_batch_sizes() -> None:
    loader = DataLoader(
        BlendDataset((seq("a", 12, 4), 1), (seq("b", 12, 3), 1), seed=0), rank=0, world_size=1
    )
    for batch in loader:
        assert len(batch["x"]) == (4 if batch["__key__"][0].startswith("a") else 3)


def test_exhausted_source_drops_out_and_epoch_ends_when_all_have_ended() -> None:
    """energon's rule: every batch of each finite source once per blend epoch, then StopIteration."""
    a, b = seq("a", 40, 2), seq("b", 6, 2)
    blend = BlendDataset((a, 0.2), (b, 0.8), seed=5)
    loader = DataLoader(blend, rank=0, world_size=1)
    assert len(loader) == 20 + 3
    first = [batch["__key__"] for batch in loader]
    assert len(first) == 23
    keys = [k for batch in first for k in batch]
    assert sorted(keys) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(6)])
    tail = first[-10:]  # b (weight 0.8) is long gone by then; only a is left
    assert all(k.startswith("a") for batch in tail for k in batch)
    second = [batch["__key__"] for batch in loader]
    assert len(second) == 23 and second != first  # next epoch: reshuffled leaves, fresh schedule


def test_repeat_restarts_a_finite_source_and_never_ends() -> None:
    small, big = seq("s", 4, 2), seq("b", 100, 2)
    blend = BlendDataset((small, 0.5), (big, 0.5), seed=1, repeat=True)
    assert blend.batches_per_epoch() is None
    sources = plan(blend, 60)
    assert sources.count(0) > 2 * 2  # more batches of the small source than one epoch of it holds
    assert small.epoch >= 2


def test_sample_weights_and_names_tag_each_batch() -> None:
    blend = BlendDataset(
        Source(seq("a", 8, 2), 1, name="laion", sample_weight=0.5),
        Source(seq("b", 8, 2), 1, name="art"),
        seed=0,
    )
    for batch in DataLoader(blend, rank=0, world_size=1):
        name = "laion" if batch["__key__"][0].startswith("a") else "art"
        assert batch["__source__"] == [name, name]
        assert batch["__weight__"].tolist() == ([0.5, 0.5] if name == "laion" else [1.0, 1.0])


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (((None, 1),), {}, "not a prep dataset"),
        (((seq("a", 2, 1), 0),), {}, "positive number"),
        (((seq("a", 2, 1), float("nan")),), {}, "positive number"),
        (((seq("a", 2, 1), 1),), {"schedule": "roundrobin"}, "random or smooth"),
        ((seq("a", 2, 1),), {}, "not \\(dataset, weight\\)"),
        ((), {}, "no sources"),
    ],
)
def test_bad_arguments_name_the_problem(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(PrepError, match=match):
        BlendDataset(*args, **kwargs)


def test_an_empty_repeated_source_is_an_error() -> None:
    empty = SequenceDataset([{"x": 1}], 2, drop_last=True, world_size=1)
    blend = BlendDataset((empty, 1), seed=0, repeat=True)
    blend.bind("")
    with pytest.raises(PrepError, match="has no batches"):
        blend.next_batch()


@pytest.mark.slow  # the first torch.optim use in a process imports torch._dynamo (~2 s)
def test_weighted_loss_example_runs() -> None:
    out = runpy.run_path(str(EXAMPLES / "weighted_loss.py"), run_name="not_main")
    losses = out["main"](steps=6)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
