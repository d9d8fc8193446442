"""bench/loaders.py's figure of merit: a loader's share of its decoder's ceiling is the median of each
round's paired ratio (the loader's run over the same round's ceiling run), prep's modes against their own
decoder and the peers, who decode with PIL, against PIL's."""

from __future__ import annotations

from bench.loaders import _pair_with_ceilings


def _run(samples_per_s: float, cpu_us: float) -> dict[str, float]:
    return {"samples_per_s": samples_per_s, "cpu_us_per_sample": cpu_us}


def test_shares_are_medians_of_the_rounds_paired_ratios() -> None:
    # the machine halves its speed in round 2: paired ratios see through it, a ratio of medians does not
    runs = {
        "ceiling/simplejpeg": [_run(100, 10), _run(50, 20), _run(100, 10)],
        "prep/decode": [_run(90, 11), _run(45, 22), _run(80, 12.5)],
        "ceiling/pil": [_run(60, 20), _run(60, 20), _run(60, 20)],
        "prep/pil": [_run(30, 40), _run(30, 40), _run(30, 40)],
        "litdata/decode": [_run(20, 60), _run(24, 50), _run(30, 40)],
        "litdata/raw": [_run(999, 1), _run(999, 1), _run(999, 1)],
    }
    results: dict[str, dict] = {"prep": {}, "litdata": {}}
    _pair_with_ceilings(runs, results)
    assert set(results["prep"]) == {"simplejpeg_share", "pil_share"}
    assert set(results["litdata"]) == {"pil_share"}  # peers decode with PIL; raw runs have no ceiling
    share = results["prep"]["simplejpeg_share"]
    assert share["samples_per_s"] == 0.9  # rounds 0.9, 0.9, 0.8
    assert share["cpu"] == 10 / 11  # rounds 10/11, 20/22, 10/12.5
    assert results["prep"]["pil_share"]["samples_per_s"] == 0.5
    assert results["litdata"]["pil_share"]["samples_per_s"] == 0.4  # rounds 1/3, 0.4, 0.5


def test_a_round_that_failed_on_either_side_is_left_out() -> None:
    runs = {
        "ceiling/simplejpeg": [_run(100, 10), {"error": "timed out"}, _run(100, 10)],
        "prep/decode": [_run(70, 14), _run(90, 11), {"error": "boom"}],
    }
    results: dict[str, dict] = {"prep": {}}
    _pair_with_ceilings(runs, results)
    assert results["prep"]["simplejpeg_share"]["rounds"] == [[0.7, round(10 / 14, 3)]]
