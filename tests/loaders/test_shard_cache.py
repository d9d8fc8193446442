"""The shard cache: remote and pipe: shards read whole into a bounded folder shared by a node's ranks and
workers. Real loopback HTTP server (Range, bearer token, latency, bandwidth), real worker processes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prep.formats.index import read_index
from prep.loaders import DataLoader, ShardDataset
from prep.loaders.io.cache import ENTRY_SUFFIX, ShardCache
from prep.testing.loader_data import make_shards, planned_keys
from prep.testing.servers import serve_files

TOKEN = "tok-5ecret-0f-the-cache-tests"
SIZES = [40] * 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_src")
    make_shards(root / "ds", SIZES, image_size=8)
    return root


def _ds(source, cache_dir, *, rank=0, world=1, **kw):
    kw.setdefault("cache_bytes", 10**9)
    return ShardDataset(source, batch_size=8, seed=2, decode="raw", window_shards=2, rank=rank,
                        world_size=world, cache_dir=cache_dir, **kw)


def _entries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(ENTRY_SUFFIX))


@pytest.mark.slow
def test_byte_limit_holds_with_two_ranks_of_two_workers_reading_at_once(data, tmp_path):
    shard_bytes = max(int(p.stat().st_size) for p in (data / "ds").glob("*.tar"))
    limit = 3 * shard_bytes  # far less than the 8 shards, and than what read-ahead asks for
    cache_dir = tmp_path / "cache"
    seen, stop = [], threading.Event()
    got: dict[int, list[str]] = {}

    def poll():
        cache = ShardCache(cache_dir, limit)
        while not stop.is_set():
            seen.append(cache.used_bytes())
            time.sleep(0.002)

    with serve_files(str(data), token=TOKEN, latency=0.002) as srv:
        def rank(r):
            loader = DataLoader(_ds(srv.url + "/ds", cache_dir, rank=r, world=2, token=TOKEN,
                                    cache_bytes=limit), num_workers=2, rank=r, world_size=2)
            got[r] = [k for _ in range(2) for b in loader for k in b["__key__"]]  # two epochs

        poller = threading.Thread(target=poll)
        poller.start()
        ranks = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
        stop.set()
        poller.join()
        downloads = len(srv.gets(".tar"))
    for r in (0, 1):
        ref = _ds(data / "ds", None, rank=r, world=2)
        want = planned_keys(ref, r, 2)
        ref.set_epoch(1)
        assert got[r] == want + planned_keys(ref, r, 2)
    assert max(seen) <= limit
    assert max(seen) > shard_bytes  # the cache was in use, several entries at once
    assert len(_entries(cache_dir)) <= 3
    assert downloads > len(SIZES)  # entries were evicted and fetched again (two epochs, room for three)


@pytest.mark.slow
def test_a_killed_reader_leaves_no_entry_and_the_next_one_reads_true_bytes(data, tmp_path):
    cache_dir = tmp_path / "cache"
    with serve_files(str(data), bandwidth=20_000) as srv:  # a shard takes seconds to arrive
        script = (
            "import sys; from prep.loaders import ShardDataset\n"
            f"ds = ShardDataset({srv.url + '/ds'!r}, batch_size=4, decode='raw', rank=0, "
            f"world_size=1, cache_dir={str(cache_dir)!r}, read_ahead=0)\n"
            "ds.bind(''); ds.fetch(ds.next_batch(), 0, 1)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
        try:
            deadline = time.monotonic() + 60
            while not srv.gets(".tar") and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # mid-download
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    names = os.listdir(cache_dir)
    assert not _entries(cache_dir)  # no entry: the half-written bytes sit in a temp only
    assert any(".tmp-" in n for n in names)
    port = int(srv.url.rsplit(":", 1)[1])
    with serve_files(str(data), port=port) as fast:  # the same URLs, so the same entries, now fast
        ds = _ds(fast.url + "/ds", cache_dir, read_ahead=0)  # sweeps the dead temp, reads true bytes
        assert planned_keys(ds) == planned_keys(_ds(data / "ds", None))
    assert not any(".tmp-" in n for n in os.listdir(cache_dir))
    local = [p.read_bytes() for p in (data / "ds").glob("*.tar")]
    cached = [(cache_dir / e).read_bytes() for e in _entries(cache_dir)]
    assert len(cached) == len(local)  # one entry per shard: the killed one's name was filled anew
    assert all(any(w.startswith(c) and len(c) > len(w) // 2 for w in local) for c in cached)


def test_a_resumed_loader_reuses_the_cached_shards(data, tmp_path):
    cache_dir = tmp_path / "cache"
    with serve_files(str(data), token=TOKEN) as srv:
        url = srv.url + "/ds"
        first = DataLoader(_ds(url, cache_dir, token=TOKEN), num_workers=2)
        list(first)  # epoch 0 caches every shard
        first.set_epoch(1)
        it = iter(first)
        [next(it) for _ in range(3)]
        state = first.state_dict()
        rest = [k for b in it for k in b["__key__"]]
        del it, first
        before = len(srv.gets(".tar"))
        assert before >= len(SIZES)
        resumed = DataLoader(_ds(url, cache_dir, token=TOKEN), num_workers=2)
        resumed.load_state_dict(state)
        assert [k for b in resumed for k in b["__key__"]] == rest
        assert len(srv.gets(".tar")) == before  # nothing downloaded again


def test_no_secret_reaches_a_cache_file_name(data, tmp_path):
    cache_dir = tmp_path / "cache"
    with serve_files(str(data), token=TOKEN) as srv:
        planned_keys(_ds(srv.url + "/ds", cache_dir, token=TOKEN))
    pipes = [f"pipe:PREP_SECRET={TOKEN} cat {data / 'ds' / f'shard-{i:05d}.tar'}" for i in range(2)]
    ds = _ds(pipes, cache_dir, allow_pipe=True)
    local = [str(data / "ds" / f"shard-{i:05d}.tar") for i in range(2)]
    assert planned_keys(ds) == planned_keys(_ds(local, None))
    assert len(_entries(cache_dir)) == len(SIZES) + 2  # every remote and pipe: shard went through the cache
    for path in cache_dir.rglob("*"):
        assert TOKEN not in str(path) and "PREP_SECRET" not in str(path)
        if path.is_file() and not path.name.endswith(ENTRY_SUFFIX):
            assert TOKEN.encode() not in path.read_bytes()


def _ranges(srv, suffix: str) -> list[tuple[str, int, int]]:
    """(path, first byte, last byte + 1) of every ranged GET ending with suffix."""
    out = []
    for r in srv.gets(suffix):
        a, _, b = r.headers["range"][len("bytes="):].partition("-")
        out.append((r.path, int(a), int(b) + 1))
    return out


def test_a_node_fetches_each_byte_and_each_index_once(data, tmp_path, monkeypatch):
    from prep.loaders.io import sources

    monkeypatch.setattr(sources, "_CHUNK", 4096)  # many chunks per shard: the sliding window at work
    cache_dir = tmp_path / "cache"
    got: dict[int, list[str]] = {}
    with serve_files(str(data), token=TOKEN, latency=0.002) as srv:
        def rank(r):
            loader = DataLoader(_ds(srv.url + "/ds", cache_dir, rank=r, world=2, token=TOKEN),
                                num_workers=2, rank=r, world_size=2)
            got[r] = [k for b in loader for k in b["__key__"]]

        ranks = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
        chunks, indexes = _ranges(srv, ".tar"), srv.gets(".idx")
        again = DataLoader(_ds(srv.url + "/ds", cache_dir, token=TOKEN), num_workers=2)
        second = [k for b in again for k in b["__key__"]]
        assert len(srv.gets(".tar")) == len(chunks) and len(srv.gets(".idx")) == len(indexes)
    for r in (0, 1):
        assert got[r] == planned_keys(_ds(data / "ds", None, rank=r, world=2), r, 2)
    assert second == planned_keys(_ds(data / "ds", None))
    assert len(indexes) == len(SIZES)  # one .idx request per shard for the whole node, then none
    assert len(set(chunks)) == len(chunks)  # no byte range asked twice
    ends = {}
    for path, a, b in sorted(chunks):
        assert a == ends.get(path, 0)  # the ranges of a shard tile it from byte 0, without gaps
        ends[path] = b
    assert len(ends) == len(SIZES)
    for path, end in ends.items():
        assert end == read_index(data / path.lstrip("/"))[-1]  # up to the end of the last sample


def test_a_redirect_is_followed_and_the_token_stays_with_its_host(data, tmp_path):
    with serve_files(str(data)) as cdn, serve_files(str(data), token=TOKEN, redirect_to=cdn.url) as hub:
        ds = _ds(hub.url + "/ds", tmp_path / "cache", token=TOKEN)
        assert planned_keys(ds) == planned_keys(_ds(data / "ds", None))
        assert hub.gets(".tar") and cdn.gets(".tar")  # every shard download went through the redirect
        assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
        assert not any("authorization" in r.headers for r in cdn.requests)


def test_a_server_without_range_support_is_named_in_one_line(data, tmp_path):
    from prep.errors import PrepError

    with serve_files(str(data), ranges=False) as srv:
        ds = _ds(srv.url + "/ds", tmp_path / "cache", read_ahead=0)
        with pytest.raises(PrepError) as err:
            planned_keys(ds)
    text = str(err.value)
    assert "Range" in text and "shard-" in text and "\n" not in text


def test_the_byte_ledger_recovers_from_failed_downloads_and_files_deleted_by_hand(tmp_path):
    from prep.loaders.io.cache import release

    cache = ShardCache(tmp_path, 3 * 1024)

    def write(n):
        return lambda fd: os.pwrite(fd, b"x" * n, 0)

    def broken(fd):
        os.pwrite(fd, b"x" * 10, 0)
        raise ConnectionError("the server went away")

    for name in ("aa.shard", "bb.shard", "cc.shard"):
        release(cache.fill(name, 1024, write(1024)))
    with pytest.raises(ConnectionError):
        cache.fill("dd.shard", 1024, broken)  # no room: evicts aa (LRU), then the download fails
    assert cache.used_bytes() == 2 * 1024 and not any(".tmp-" in n for n in os.listdir(tmp_path))
    ledger = int.from_bytes((tmp_path / ".cache.lock").read_bytes()[:8], "little")
    assert ledger == 2 * 1024  # the failed reservation was given back
    release(cache.fill("ee.shard", 1024, write(1024)))
    (tmp_path / "bb.shard").unlink()  # by hand: the ledger over-counts, never under
    release(cache.fill("ff.shard", 1024, write(1024)))  # fits without evicting cc or ee
    assert _entries(tmp_path) == ["cc.shard", "ee.shard", "ff.shard"]
    assert cache.used_bytes() == 3 * 1024


def test_a_cached_http_dataset_starts_without_fsspecs_http_stack(data, tmp_path):
    """Manifest, .idx and shards of a plain http(s) source come through io/http_range, so neither the main
    process nor a worker pays fsspec's and aiohttp's import (0.2-0.3 s each) when a cache is used."""
    with serve_files(str(data), token=TOKEN) as srv:
        script = (
            "import sys; from prep.loaders import ShardDataset\n"
            "from prep.testing.loader_data import planned_keys\n"
            f"ds = ShardDataset({srv.url + '/ds'!r}, batch_size=8, seed=2, decode='raw', window_shards=2,"
            f" rank=0, world_size=1, token={TOKEN!r}, cache_dir={str(tmp_path / 'c')!r})\n"
            "print(len(planned_keys(ds)), 'aiohttp' in sys.modules,\n"
            "      'fsspec.implementations.http' in sys.modules)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(sum(SIZES)), "False", "False"]
