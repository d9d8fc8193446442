"""BlendDataset: weights that hold as shares (random: within 1% and exact at block ends; smooth: exact
floor/ceil), short runs, per-source batch sizes, energon's exhaustion rule by name, repeat, sample
weights, and the errors users meet."""

from __future__ import annotations

import math
import runpy
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from prep.errors import PrepError
from prep.loaders import BlendDataset, DataLoader, SequenceDataset, Source
from prep.loaders.combinators.blend import exact_weights, smooth_pick
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


def test_random_choice_is_a_function_of_seed_and_cursor() -> None:
    def build(seed: int) -> BlendDataset:
        return BlendDataset((seq("a", 10, 2), 1), (seq("b", 10, 2), 1), seed=seed, repeat=True)

    assert plan(build(3), 200) == plan(build(3), 200)
    assert plan(build(3), 200) != plan(build(4), 200)
    # batch g's choice does not depend on how the blend got there: jump straight to g = 150 (mid-block)
    full = plan(build(3), 200)
    ahead = build(3)
    plan(ahead, 150)
    jumped = build(3)
    jumped.bind("")
    jumped.load_state_dict(ahead.state_dict())
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
    with pytest.warns(UserWarning, match="not the weights"):
        blend = BlendDataset((a, 0.2), (b, 0.8), seed=5, mode="exhaust")
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
        (((seq("a", 2, 1), 1),), {"mode": "ratios"}, "ratio or exhaust"),
        (((seq("a", 2, 1), 1),), {"mode": "ratio", "repeat": False}, "contradicts"),
        (((seq("a", 2, 1), 1),), {"mode": "exhaust", "epoch_batches": 5}, "ratio' only"),
        (((seq("a", 2, 1), 1),), {"epoch_batches": 0}, "positive number of batches"),
        ((seq("a", 2, 1),), {}, "not \\(dataset, weight\\)"),
        ((), {}, "no sources"),
        ((Source(seq("a", 2, 1), 1, sample_weight="2"),), {}, "sample_weight '2' .* not a finite number"),
        ((Source(seq("a", 2, 1), 1, sample_weight=True),), {}, "sample_weight True .* not a finite number"),
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


# ------------------------------------------------------------------------- weights that hold (ratio mode)
def _runs(picks: list[int]) -> dict[int, int]:
    """The longest run of each source in a pick sequence."""
    out: dict[int, int] = {}
    run = 0
    for k, i in enumerate(picks):
        run = run + 1 if k and picks[k - 1] == i else 1
        out[i] = max(out.get(i, 0), run)
    return out


def _readme_blend(schedule: str, seed: int = 42) -> BlendDataset:
    """The README's usage: two sources of other sizes (31 and 25 batches per epoch) at 0.7 / 0.3."""
    laion, art = seq("l", 31 * 32, 32, seed=0), seq("a", 25 * 16, 16, seed=1)
    return BlendDataset((laion, 0.7), (art, 0.3), seed=seed, schedule=schedule)


@pytest.mark.parametrize("schedule", ["random", "smooth"])
def test_readme_usage_holds_its_ratio_over_10000_batches(schedule: str) -> None:
    blend = _readme_blend(schedule)
    blend.bind("")
    assert blend.batches_per_epoch() == 56  # an epoch: as many batches as the sources hold
    picks: list[int] = []
    while len(picks) < 10_000:  # across ~180 blend epochs
        try:
            picks.append(blend.next_batch().items[0])
        except StopIteration:
            continue
    share = picks.count(0) / len(picks)
    assert abs(share - 0.7) < 0.01, share
    if schedule == "smooth":  # exact: floor/ceil of g * w after every g, across epoch ends
        a = 0
        for g, i in enumerate(picks, start=1):
            a += i == 0
            assert math.floor(g * 0.7) <= a <= math.ceil(g * 0.7 + 1e-9), g
    else:  # exact at every block's end, within a block anywhere
        counts = Counter()
        for g, i in enumerate(picks, start=1):
            counts[i] += 1
            assert abs(counts[0] - 0.7 * g) <= 64 * 0.3 + 1
            if g % 64 == 0:
                assert math.floor(g * 0.7) <= counts[0] <= math.ceil(g * 0.7), g


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.5], [5, 2, 1], [0.9, 0.1]])
def test_no_run_of_one_source_longer_than_the_weights_imply(weights: list[float]) -> None:
    n = 10_000
    total = sum(weights)
    for schedule in ("smooth", "random"):
        blend = BlendDataset(*[(seq(str(i), 100 * (i + 1), 2), w) for i, w in enumerate(weights)],
                             schedule=schedule, seed=7, repeat=True)
        runs = _runs(plan(blend, n))
        for i, w in enumerate(weights):
            p = w / total
            if schedule == "smooth":  # another source is due at least every ceil(1 / (1 - p)) picks
                bound = math.ceil(p / (1 - p))
            else:  # a run this long would be expected less than 0.01 times in n independent draws
                bound = math.ceil(math.log(0.01 / (n * (1 - p))) / math.log(p))
            assert runs.get(i, 0) <= bound, (schedule, weights, i, runs, bound)


def test_two_equal_sources_at_07_03_hold_the_ratio_from_the_start() -> None:
    """The issue's second case: two sources of 250 batches; 600 batches gave 51.8% and a run of 153."""
    blend = BlendDataset((seq("a", 500, 2), 0.7), (seq("b", 500, 2), 0.3), seed=0)
    loader = DataLoader(blend, rank=0, world_size=1)
    batches = _forever(loader)
    picks = [0 if next(batches)["__key__"][0].startswith("a") else 1 for _ in range(600)]
    assert abs(picks.count(0) / 600 - 0.7) < 0.01
    assert max(_runs(picks).values()) < 20


def _forever(loader):
    while True:
        yield from loader


def test_ratio_mode_sources_go_on_across_blend_epochs_and_resume_exactly() -> None:
    def build() -> BlendDataset:
        return BlendDataset((seq("a", 30, 2), 0.5), (seq("b", 8, 2), 0.5), seed=3)

    loader = DataLoader(build(), rank=0, world_size=1)
    assert len(loader) == 15 + 4
    keys = [b["__key__"] for _ in range(3) for b in loader]
    assert len(keys) == 3 * 19
    a_batches = [batch for batch in keys if batch[0].startswith("a")]
    assert len(a_batches) > 15
    # a's first 15 batches are its whole first epoch, though a blend epoch ended inside it: not restarted
    assert sorted(k for batch in a_batches[:15] for k in batch) == sorted(f"a{i}" for i in range(30))
    again = DataLoader(build(), rank=0, world_size=1)
    it = iter(again)
    [next(it) for _ in range(7)]
    state = again.state_dict()
    resumed = DataLoader(build(), rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = [b["__key__"] for b in resumed] + [b["__key__"] for _ in range(2) for b in resumed]
    assert rest == keys[7:]


def test_ratio_mode_never_warns_and_exhaust_mode_warns_only_when_far_from_the_weights() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlendDataset((seq("a", 40, 2), 0.2), (seq("b", 6, 2), 0.8), seed=5)
        BlendDataset((seq("a", 40, 2), 0.5), (seq("b", 40, 2), 0.5), mode="exhaust")  # shares = weights
    with pytest.warns(UserWarning, match="mode='ratio'"):
        BlendDataset((seq("a", 40, 2), 0.2), (seq("b", 6, 2), 0.8), repeat=False)
    with pytest.warns(UserWarning, match="larger epoch_batches"):  # 0.05 x 10 batches < one batch
        BlendDataset((seq("a", 40, 2), 0.95), (seq("b", 6, 2), 0.05), epoch_batches=10)


def test_random_blend_first_source_over_seeds_follows_the_weights() -> None:
    """The block order is a fresh stream per seed: the first batch's source is source 0 with p = 0.7."""
    first = [plan(BlendDataset((seq("a", 10, 2), 0.7), (seq("b", 10, 2), 0.3), seed=s, repeat=True), 1)[0]
             for s in range(1000)]
    chi2 = (first.count(0) - 700) ** 2 / 700 + (first.count(1) - 300) ** 2 / 300
    assert chi2 < 10.828, first.count(0)  # chi-square, 1 degree of freedom, p = 0.001


def test_random_blend_blocks_are_independent_between_epochs_and_blocks() -> None:
    """Exhaust mode keys its blocks by epoch: the choices of epoch e and e+1 are uncorrelated, and so are
    those of successive blocks."""
    import numpy as np

    def choices(epoch: int) -> np.ndarray:
        blend = BlendDataset((seq("a", 20_000, 1), 0.5), (seq("b", 20_000, 1), 0.5), mode="exhaust", seed=9)
        blend.bind("")
        blend.set_epoch(epoch)
        return np.asarray([blend.next_batch().items[0] for _ in range(64 * 120)])

    a, b = choices(0), choices(1)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    blocks = a.reshape(-1, 64)
    assert abs(np.corrcoef(blocks[:-1].ravel(), blocks[1:].ravel())[0, 1]) < 0.05
