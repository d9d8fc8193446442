"""Worker queues that write in the caller's thread while the pipe has room (`prep.loaders.io.queues`)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as mp_context
import pickle
import queue
import random
import threading
import time
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from prep.loaders import DataLoader, MapDataset, SequenceDataset, ShardDataset
from prep.loaders.base import BatchDesc
from prep.loaders.io.queues import CallerWritesQueue, caller_writes_context, dumps
from prep.testing.loader_data import make_shards


def _feeders() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("QueueFeeder")]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("queues")
    make_shards(root, [24, 24, 24])
    return root


def test_training_process_starts_no_feeder_thread_and_batches_are_unchanged(shards):
    """torch's request queues would each start a feeder thread in the training process; these write in
    the caller's thread, and the batches are those of an in-process run."""
    before = _feeders()
    ds = ShardDataset(shards, batch_size=4, seed=3)
    want = list(DataLoader(ds, num_workers=0))
    ds2 = ShardDataset(shards, batch_size=4, seed=3)
    loader = DataLoader(ds2, num_workers=2)
    got = []
    for batch in loader:
        got.append(batch)
        assert _feeders() == before
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))


def _worker_threads(sample: dict) -> dict:
    return {**sample, "feeders": _feeders()}


def test_workers_send_batches_without_a_feeder_thread():
    """A worker's results (a few KiB each: batches travel as shared-memory references) are written by the
    worker's own thread: it never starts a feeder thread, for any batch."""
    ds = SequenceDataset([{"x": i} for i in range(64)], 4, transform=_worker_threads)
    batches = list(DataLoader(ds, num_workers=2))
    assert [b["x"].tolist() for b in batches] == [list(range(i, i + 4)) for i in range(0, 64, 4)]
    assert all(f == [] for b in batches for f in b["feeders"])


def _blob(samples: list) -> dict:
    return {"x": [s["x"] for s in samples], "blob": b"\xab" * 300_000}  # pickled inline, not shared


def test_a_loader_stopped_with_the_pipe_full_shuts_down_without_waiting_out_torch():
    """Results too large for the pipe's free room go to the feeder thread, so a worker never blocks in a
    write that nobody will read: when the training process stops reading, each worker sees the stop and
    exits. (A worker stuck in such a write is waited for `MP_STATUS_CHECK_INTERVAL`, 5 s, then killed.)"""
    from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

    ds = SequenceDataset([{"x": i} for i in range(400)], 2, collate_fn=_blob)
    loader = DataLoader(ds, num_workers=2, prefetch_factor=4, batches_per_fetch=1)
    it = iter(loader)
    assert next(it)["x"] == [0, 1]
    time.sleep(1.0)  # the workers fill the pipe with batches the trainer will not take
    started = time.monotonic()
    it.close()  # torch's iterator goes: it stops its workers and joins them
    assert time.monotonic() - started < MP_STATUS_CHECK_INTERVAL


def _echo(inbox: CallerWritesQueue, outbox: CallerWritesQueue, n: int) -> None:
    for _ in range(n):
        outbox.put(inbox.get(timeout=30))  # not the owner here: the feeder thread writes


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_messages_arrive_in_order_both_ways(method):
    """The owner's direct writes and a child's feeder-thread writes both keep the order of `put`, for
    messages from a few bytes to several times the pipe's buffer."""
    ctx = caller_writes_context(method)
    inbox, outbox = ctx.Queue(), ctx.Queue()
    assert isinstance(inbox, CallerWritesQueue)
    rng = random.Random(7)
    msgs = [(i, bytes(rng.randrange(256) for _ in range(8)) * rng.choice([1, 100, 40_000]))
            for i in range(60)]
    child = ctx.Process(target=_echo, args=(inbox, outbox, len(msgs)))
    child.start()
    try:
        for m in msgs:
            inbox.put(m)
        assert [outbox.get(timeout=30) for _ in msgs] == msgs
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert inbox._thread is not None  # the large messages went to the feeder thread, the first ones not


def test_small_messages_never_start_the_feeder_thread():
    q = caller_writes_context("fork").Queue()
    for i in range(200):
        q.put(("request", i))
    assert [q.get(timeout=5) for _ in range(200)] == [("request", i) for i in range(200)]
    assert q._thread is None


def test_put_keeps_the_queue_contract():
    q = caller_writes_context("fork").Queue(maxsize=2)
    q.put(1)
    q.put(2)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    assert q.get(timeout=5) == 1
    q.put(3, timeout=5)
    assert [q.get(timeout=5), q.get(timeout=5)] == [2, 3]
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(4)


_PICKLED = [0]


class _CountsPickling:
    """Pickling it has an effect, as a slot's first send (its segment goes once) or torch's descriptor
    registration do: the message must be pickled once, whichever way it is written."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        _PICKLED[0] += 1
        return _CountsPickling, (self.payload,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CountsPickling) and other.payload == self.payload


def test_a_message_too_big_for_the_pipe_goes_to_the_feeder_pickled_once():
    q = caller_writes_context("fork").Queue()
    small, big = _CountsPickling(b"s"), _CountsPickling(bytes(range(256)) * 12_000)  # 3 MB: no room
    _PICKLED[0] = 0
    q.put(small)
    q.put(big)  # the feeder thread writes it, and every later message
    q.put(small)
    assert [q.get(timeout=30) for _ in range(3)] == [small, big, small]
    assert _PICKLED[0] == 3 and q._thread is not None  # (the feeder pickles the last one before writing it)


def _long_captions(batch: dict) -> dict:
    return {**batch, "long": [f"{k}:" + "c" * 3_000 for k in range(500)]}  # 1.5 MB: past the pipe's room


def test_a_batch_larger_than_the_pipe_arrives_with_its_slot(shards):
    """A batch whose pickle does not fit the result pipe (long captions) goes to the feeder thread: the
    slot's segment, sent with the first pickle only, must travel in it (pickling it twice sent it
    nowhere, and the training process failed on a slot it never received)."""
    def dataset():
        return MapDataset(ShardDataset(shards, batch_size=4, seed=3), _long_captions)

    want = list(DataLoader(dataset(), num_workers=0))
    got = list(DataLoader(dataset(), num_workers=1))
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))


def test_a_context_with_its_own_queue_is_kept():
    class Custom(type(multiprocessing.get_context("fork"))):  # type: ignore[misc]
        def Queue(self, maxsize=0):
            return super().Queue(maxsize)

    custom = Custom()
    assert caller_writes_context(custom) is custom
    assert isinstance(caller_writes_context(None), mp_context.BaseContext)


@pytest.mark.slow
def test_spawned_workers_load_the_same_batches(shards):
    ds = ShardDataset(shards, batch_size=4, seed=5)
    want = list(DataLoader(ds, num_workers=0))
    got = list(DataLoader(ShardDataset(shards, batch_size=4, seed=5), num_workers=1,
                          multiprocessing_context="spawn"))
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))


class _Marked:
    pass


def test_dumps_pickles_as_forkingpickler_does():
    """The same reducers as `ForkingPickler` (torch's shared tensors), including one registered after
    import, and the same bytes where reducing is deterministic."""
    ForkingPickler.register(_Marked, lambda m: (int, (42,)))
    try:
        shared = torch.arange(6).share_memory_()
        plain = (3, [BatchDesc("a/b", range(4), {"epoch": 1})], {"s": ["x", "y"], "m": _Marked()})
        assert bytes(dumps(plain)) == bytes(ForkingPickler.dumps(plain))
        assert pickle.loads(dumps(plain))[2]["m"] == 42
        back = pickle.loads(dumps({"t": shared}))["t"]
        assert back.is_shared() and torch.equal(back, shared)
        back[0] = 7  # the same memory, not a copy
        assert shared[0] == 7
    finally:
        del ForkingPickler._extra_reducers[_Marked]


def test_a_python_whose_queue_lacks_the_private_parts_keeps_torchs_queues(monkeypatch):
    from prep.loaders.io import queues

    monkeypatch.setattr(queues, "_INTERNALS", (*queues._INTERNALS, "_gone_in_a_later_python"))
    monkeypatch.setattr(queues, "_INTERNALS_FOUND", [])
    fork = multiprocessing.get_context("fork")
    assert caller_writes_context(fork) is fork
    assert type(caller_writes_context("fork").Queue()) is not CallerWritesQueue
