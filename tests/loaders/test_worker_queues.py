"""Worker request queues written in the training process's own thread (`prep.loaders.io.queues`)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as mp_context
import queue
import random
import threading

import pytest
import torch

from prep.loaders import DataLoader, ShardDataset
from prep.loaders.io.queues import CallerWritesQueue, caller_writes_context
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
    """torch's index queues would each start a feeder thread in the training process; these write in
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
