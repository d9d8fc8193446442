"""Remote reads that fail transiently are retried (`io/retry`), with and without the shard cache: a loopback
store fails the first requests of every path (a 503 with Retry-After, a connection cut mid-body, a
stall past the client's timeout, a reset) and then heals, and an epoch read by two workers is the local
shards' epoch byte for byte. Answers that asking again would not change fail at once, and retries that
run out end in one line. Delays are tiny (the policy's settings); nothing here is timed."""

import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prep.errors import PrepError
from prep.loaders import DataLoader, RetryPolicy, ShardDataset
from prep.loaders.io.retry import Failure, decide
from prep.testing.loader_data import make_shards, planned_keys
from prep.testing.servers import serve_files, signed_url

SIZES = [7, 5, 6]
FAST = RetryPolicy(retries=4, base_delay=0.001, max_delay=0.01, timeout=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retry_src")
    make_shards(root / "ds", SIZES, image_size=8)
    make_shards(root / "noidx", SIZES[:1], image_size=8, index=False, manifest=False)
    return root


def _ds(source, cache_dir=None, **kw):
    kw.setdefault("retry", FAST)
    return ShardDataset(source, batch_size=4, seed=5, decode="raw", window_shards=2, rank=0, world_size=1,
                        cache_dir=cache_dir, **kw)


def _epoch(ds, workers=2):
    """Every batch of one epoch as (keys, {member: bytes}), in order."""
    loader = DataLoader(ds, num_workers=workers)
    out = [(b["__key__"], {k: v for k, v in b.items() if k != "__key__"}) for b in loader]
    return out, loader.stats()


def _local_epoch(data):
    return _epoch(_ds(str(data / "ds"), retry=RetryPolicy()), workers=0)[0]


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cached"])
@pytest.mark.parametrize("fault", [503, "cut", "stall", "reset"])
def test_an_epoch_through_failing_then_healed_requests_is_the_local_epoch(data, tmp_path, fault, cached):
    want = _local_epoch(data)
    with serve_files(data) as srv:
        # every path (manifest, each .idx, each shard) fails its first two requests, then is served
        srv.fail("*", fault, times=2, retry_after=0.001 if fault == 503 else None)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ds = _ds(srv.url + "/ds", tmp_path / "cache" if cached else None)
            got, stats = _epoch(ds)
    assert got == want  # the same samples, bytes and order as from disk
    assert stats["retries"]["count"] >= 2 and stats["retries"]["by_reason"]
    assert "127.0.0.1" in stats["retries"]["last"]
    retried = [w for w in seen if "retried" in str(w.message)]
    assert 1 <= len(retried) <= 3  # rate-limited: once a minute per process that reports (main, 2 workers)


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cached"])
def test_hub_reads_are_retried_as_any_https_store(data, tmp_path, monkeypatch, cached):
    repo = tmp_path / "hub" / "datasets" / "me" / "shards" / "resolve" / "main"
    make_shards(repo / "ds", SIZES, image_size=8)  # what the hub serves at its resolve URLs
    want = _local_epoch(data)
    with serve_files(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        hub.fail("*", 503, times=2)
        got, stats = _epoch(_ds("hf://datasets/me/shards/ds", tmp_path / "cache" if cached else None))
    assert got == want and stats["retries"]["by_reason"].get("HTTP 503")


def test_a_tar_without_index_is_scanned_again_after_a_cut(data):
    with serve_files(data) as srv:
        want = planned_keys(_ds(srv.url + "/noidx/shard-00000.tar", shuffle=False))
        srv.fail("/noidx/*", "cut", times=2)
        assert planned_keys(_ds(srv.url + "/noidx/shard-00000.tar", shuffle=False)) == want


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cached"])
@pytest.mark.parametrize(("status", "fix"), [(404, "check the URL"), (403, "token"), (401, "token"),
                                              (416, "regenerate")])
def test_an_answer_that_would_not_change_fails_at_once_in_one_line(data, tmp_path, cached, status, fix):
    with serve_files(data) as srv:
        ds = _ds(srv.url + "/ds", tmp_path / "cache" if cached else None)
        # each requester's first request fails, a retry would be served: the reader, and with the cache
        # the read-ahead thread before it (whose verdict the reader raises, or that it meets itself)
        srv.fail("/ds/*.tar", status, times=2 if cached else 1)
        with pytest.raises(PrepError) as err:
            _epoch(ds, workers=0)
    text = str(err.value)
    assert f"HTTP {status}" in text and "/ds/shard-0000" in text and fix in text and "\n" not in text
    assert "attempt" not in text


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cached"])
def test_retries_that_run_out_end_in_one_line_naming_the_redacted_url(data, tmp_path, cached):
    with serve_files(data, signing_key="k3y") as srv:
        url = signed_url(srv.url + "/ds/shard-00001.tar", "k3y")
        ds = _ds(url, tmp_path / "cache" if cached else None, read_ahead=0,
                 retry=RetryPolicy(retries=2, base_delay=0.001, max_delay=0.01))
        srv.fail("/ds/*.tar", 503, times=10**6)
        before = len(srv.gets("/ds/shard-00001.tar"))  # the header scan that listed it
        with pytest.raises(PrepError) as err:
            _epoch(ds, workers=0)
        tries = len(srv.gets("/ds/shard-00001.tar")) - before
    text = str(err.value)
    assert "HTTP 503" in text and "3 attempts over" in text and "RetryPolicy" in text and "\n" not in text
    assert "/ds/shard-00001.tar" in text and "sig=" not in text and "k3y" not in text
    assert tries and tries % 3 == 0  # each request tried three times, then given up


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cached"])
def test_no_retries_fail_at_the_first_failure(data, tmp_path, cached):
    with serve_files(data) as srv:
        ds = _ds(srv.url + "/ds", tmp_path / "cache" if cached else None, retry=RetryPolicy(retries=0))
        srv.fail("/ds/*.tar", 503, times=1)
        with pytest.raises(PrepError, match=r"HTTP 503 .*1 attempt over"):
            _epoch(ds, workers=0)


def test_a_cut_download_is_not_blamed_on_range_support(data, tmp_path):
    with serve_files(data) as srv:
        ds = _ds(srv.url + "/ds", tmp_path / "cache", retry=RetryPolicy(retries=0), read_ahead=0)
        srv.fail("/ds/*.tar", "cut", times=1)
        with pytest.raises(PrepError) as err:
            _epoch(ds, workers=0)
    assert "connection cut" in str(err.value) and "Range" not in str(err.value)


def test_a_retry_after_header_reaches_the_policy(data, tmp_path):
    import os

    from prep.loaders.io.http_range import FetchError, get_range_into
    from prep.loaders.io.retry import classify

    with serve_files(data) as srv:
        srv.fail("/ds/shard-00000.tar", 429, times=1, retry_after=7)
        out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(FetchError) as err:
                get_range_into(srv.url + "/ds/shard-00000.tar", 0, 10, {}, out, 5.0)
        finally:
            os.close(out)
    failure = classify(err.value)
    assert failure is not None and failure.transient and failure.retry_after == 7
    assert decide(1, failure, RetryPolicy(max_delay=30), 0.5) == 7
    assert decide(1, failure, RetryPolicy(max_delay=2), 0.5) == 2  # capped


statuses = st.one_of(st.none(), st.integers(100, 599))


@given(attempt=st.integers(1, 50), status=statuses, after=st.one_of(st.none(), st.floats(0, 1e6)),
       retries=st.integers(0, 10), base=st.floats(0, 10), cap=st.floats(0, 100), draw=st.floats(0, 0.999))
def test_the_policy_waits_within_its_bounds_and_gives_up_exactly_when_it_should(
        attempt, status, after, retries, base, cap, draw):
    transient = status is None or status in (408, 425, 429) or status >= 500
    policy = RetryPolicy(retries=retries, base_delay=base, max_delay=cap)
    wait = decide(attempt, Failure(status, "x", transient, after), policy, draw)
    if not transient or attempt > retries:
        assert wait is None
        return
    assert wait is not None and 0 <= wait <= cap
    if after is not None:
        assert wait == min(after, cap)
    else:
        full = min(cap, base * 2.0 ** (attempt - 1))
        assert full / 2 <= wait <= full or math.isclose(wait, full)


def test_a_policy_that_makes_no_sense_is_refused_in_one_line():
    for bad in ({"retries": -1}, {"retries": 1.5}, {"base_delay": -1}, {"timeout": 0}, {"max_delay": "x"}):
        with pytest.raises(PrepError) as err:
            RetryPolicy(**bad)
        assert "\n" not in str(err.value)
