"""Durations in ep/ba/sp, and a step's length in all three units from whichever key set it."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prep.pipeline import parse_pipeline_config
from prep.pipeline.durations import Duration, parse_duration
from prep.pipeline.plan import step_length


@given(st.integers(1, 10**9), st.sampled_from(["ep", "ba", "sp"]))
def test_round_trip(value, unit):
    d = parse_duration(f"{value}{unit}")
    assert d == Duration(value, unit) and parse_duration(str(d)) == d


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2e6sp", Duration(2_000_000, "sp")),
        (1000, Duration(1000, "ba")),
        (" 3 ep", Duration(3, "ep")),
        ("1.0e3ba", Duration(1000, "ba")),
    ],
)
def test_forms(text, want):
    assert parse_duration(text) == want


@pytest.mark.parametrize("bad", ["0ba", "-1ep", "1.5ep", "10", "10 steps", True, 0, None, "nanba"])
def test_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def _step(**keys):
    cfg = parse_pipeline_config(
        {
            "datasets": {"a": {"type": "prep", "path": "/x"}},
            "default_dataset": "a",
            "steps": [{"name": "s", **keys}],
        }
    )
    return cfg.steps[0]


@given(st.integers(1, 50), st.integers(1, 40), st.integers(1, 16))
def test_lengths_agree_across_units(n, bpe, batch):
    spe = bpe * batch
    by_epochs = step_length(_step(n_epochs=n), bpe, spe)
    assert (by_epochs.epochs, by_epochs.batches, by_epochs.samples) == (n, n * bpe, n * spe)
    by_batches = step_length(_step(duration=f"{n * bpe}ba"), bpe, spe)
    assert (by_batches.epochs, by_batches.samples) == (n, n * spe)
    by_samples = step_length(_step(duration=f"{n * spe - batch + 1}sp"), bpe, spe)  # rounds up to batches
    assert by_samples.batches == n * bpe and by_samples.epochs == n


def test_cap_is_the_length_when_no_length_key():
    length = step_length(
        _step(transition_on={"mode": "loss_threshold", "metric": "l", "threshold": 0.1, "max_epochs": 4}),
        10,
        40,
    )
    assert (length.epochs, length.batches, length.rule) == (4, 40, "transition_on.max_epochs 4")
    assert step_length(_step(n_epochs=3), None, None).batches is None  # endless or unbuilt: unknown


@given(st.integers(2, 40), st.integers(2, 16), st.data())
def test_samples_count_in_the_batch_size_despite_a_short_last_batch(bpe, batch, data):
    """An epoch of bpe batches whose last one is short: `k * batch` samples are k batches (the average
    batch of the epoch, rounded, was used and gave more or fewer)."""
    short = data.draw(st.integers(1, batch - 1))
    spe = (bpe - 1) * batch + short
    k = data.draw(st.integers(1, 3 * bpe))
    length = step_length(_step(duration=f"{k * batch}sp"), bpe, spe, batch)
    assert length.batches == k and length.samples == k * batch
