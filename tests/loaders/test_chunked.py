"""Chunked iteration: coverage (after ceil(N/chunk) chunks every sample once), next pass reshuffled,
exact resume at random cut points with fast-forward (skipped batches never loaded, counter advances),
limit_batches vs chunk_size, ranks, and the same over prep dataset trees (windows of the batch stream)."""

from __future__ import annotations

import json
import random
import runpy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from prep.errors import PrepError
from prep.loaders import BlendDataset, ChunkedDataLoader, ChunkedSampler, SequenceDataset
from prep.testing.loader_data import freed_without_gc, keyed_sequence

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Counting(torch.utils.data.Dataset):
    """Map-style dataset that counts loads (in the main process: num_workers=0)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads: Counter[int] = Counter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loads[i] += 1
        return i


def indices(batch: Any) -> list[int]:
    return batch.tolist()


@pytest.mark.parametrize("size,chunk", [(10, 3), (12, 4), (7, 7), (5, 9), (100, 1)])
def test_sampler_covers_every_index_once_per_pass_and_reshuffles(size: int, chunk: int) -> None:
    s = ChunkedSampler(size, chunk, seed=1)
    per_pass = s.chunks_per_pass
    assert per_pass == -(-size // min(chunk, size))
    first = [i for _ in range(per_pass) for i in s]
    second = [i for _ in range(per_pass) for i in s]
    assert sorted(first) == sorted(second) == list(range(size))
    assert first != second or size == 1 or per_pass == size  # the next pass is a new permutation
    assert s.chunk == 2 * per_pass


def test_sampler_jumps_resumes_and_refuses_another_setup() -> None:
    s = ChunkedSampler(20, 6, seed=3)
    walked = [list(s) for _ in range(6)]
    jumped = ChunkedSampler(20, 6, seed=3)
    jumped.set_chunk(5)
    assert list(jumped) == walked[5]  # chunk 5 directly, no replay
    part = ChunkedSampler(20, 6, seed=3)
    part.set_epoch(2)  # a trainer's epoch is a chunk
    it = iter(part)
    head = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(part.state_dict()))
    again = ChunkedSampler(20, 6, seed=3)
    again.load_state_dict(state)
    again.set_epoch(2)  # the same chunk keeps the restored offset
    assert len(again) == 2 and head + list(again) == walked[2]
    with pytest.raises(PrepError, match="same dataset size"):
        ChunkedSampler(21, 6, seed=3).load_state_dict(state)
    assert list(ChunkedSampler(5, 2, shuffle=False)) == [0, 1]


@pytest.mark.parametrize("size,chunk,world", [(20, 8, 2), (21, 10, 4), (7, 7, 3)])
def test_sampler_on_several_ranks_splits_each_chunk_evenly(size: int, chunk: int, world: int) -> None:
    ranks = [ChunkedSampler(size, chunk, seed=5, rank=r, world_size=world) for r in range(world)]
    whole = ChunkedSampler(size, chunk, seed=5, rank=0, world_size=1)
    for _ in range(whole.chunks_per_pass):
        window = list(whole)
        lengths = {len(s) for s in ranks}
        parts = [list(s) for s in ranks]
        assert len(lengths) == 1 and {len(p) for p in parts} == lengths  # the same count on every rank
        got = [i for p in parts for i in p]
        assert set(got) == set(window) and len(got) - len(window) < world  # padding: fewer than world repeats
        batch = 2  # consecutive per-rank batches form the global batches
        assert (
            sorted(parts[0][:batch] + [i for p in parts[1:] for i in p[:batch]])
            == sorted(window[: batch * world])
            or len(window) < batch * world
        )


def test_each_iter_is_the_next_chunk_and_everything_is_seen_once() -> None:
    data = Counting(50)
    loader = ChunkedDataLoader(data, batch_size=4, chunk_size=3, rank=0, world_size=1)
    assert loader.chunks_per_pass == 5  # 12 samples per chunk: 12, 12, 12, 12, 2
    lengths, seen = [], []
    for _ in range(5):
        lengths.append(len(loader))
        seen += [i for b in loader for i in indices(b)]
    assert lengths == [3, 3, 3, 3, 1]
    assert sorted(seen) == list(range(50))
    assert loader.batches_consumed == 13 and loader.chunk == 5


def random_cuts(total: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, total), 3))


def run(loader: ChunkedDataLoader, chunks: int) -> list[list[int]]:
    return [indices(b) for _ in range(chunks) for b in loader]


def stop_after(loader: ChunkedDataLoader, n: int) -> list[list[int]]:
    """Consume n batches, chunk after chunk, and stop in the middle of one."""
    out: list[list[int]] = []
    while len(out) < n:
        for b in loader:
            out.append(indices(b))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_random_cuts_fast_forwards_exactly(workers: int) -> None:
    def build(data: Counting | None = None, workers: int = 0) -> ChunkedDataLoader:
        extra = {"persistent_workers": True} if workers else {}
        return ChunkedDataLoader(
            data or Counting(45), 3, 4, seed=7, num_workers=workers, rank=0, world_size=1, **extra
        )

    reference = run(build(), 10)  # 4 chunks per pass of 45: two passes and a bit
    cuts = random_cuts(len(reference), seed=workers) if workers == 0 else [9]
    for cut in cuts:
        first = build()
        head = stop_after(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        data = Counting(45)
        resumed = build(data, workers)
        resumed.load_state_dict(state)
        assert resumed.batches_consumed == cut  # the counter includes the skipped batches
        left_in_chunk = resumed.remaining  # 0 when the cut fell on a chunk's end: iter() starts the next
        rest: list[list[int]] = []
        for n in range(10 - state["chunk"] - (left_in_chunk == 0)):
            got = [indices(b) for b in resumed]
            if n == 0 and left_in_chunk:
                assert len(got) == left_in_chunk
            if n == 0 and workers == 0:  # fast-forward: nothing before the cursor was loaded
                assert sum(data.loads.values()) == sum(len(b) for b in got)
            rest += got
        assert head + rest == reference, f"cut {cut}"


def test_limit_batches_without_chunks_and_chunk_precedence() -> None:
    data = Counting(40)
    limited = ChunkedDataLoader(data, batch_size=4, limit_batches=3, rank=0, world_size=1)
    assert len(limited) == 3
    e0, e1 = [indices(b) for b in limited], [indices(b) for b in limited]
    assert len(e0) == len(e1) == 3 and e0 != e1  # each epoch: the first 3 batches of a fresh shuffle
    assert len(ChunkedDataLoader(data, batch_size=4, limit_batches=0.5, rank=0, world_size=1)) == 5
    chunked = ChunkedDataLoader(data, batch_size=4, chunk_size=2, limit_batches=3, rank=0, world_size=1)
    assert len(chunked) == 2 and chunked.limit_batches is None
    plain = ChunkedDataLoader(data, batch_size=4, shuffle=False, rank=0, world_size=1)
    assert [i for b in plain for i in indices(b)] == list(range(40))
    with pytest.raises(PrepError, match="float above 1"):
        ChunkedDataLoader(data, batch_size=4, limit_batches=1.5, rank=0, world_size=1)


def test_ranks_split_each_global_batch() -> None:
    data = Counting(30)
    per_rank = [[indices(b) for b in ChunkedDataLoader(data, 2, 3, rank=r, world_size=2)] for r in range(2)]
    whole = [indices(b) for b in ChunkedDataLoader(data, 4, 3, rank=0, world_size=1)]
    assert [a + b for a, b in zip(*per_rank, strict=True)] == whole


def test_drop_last_drops_the_short_batch_of_each_chunk() -> None:
    loader = ChunkedDataLoader(Counting(22), batch_size=4, chunk_size=3, drop_last=True, rank=0, world_size=1)
    lengths = []
    for _ in range(2):  # chunks of 12 samples: 12 -> 3 batches, then 10 -> 2 batches (2 dropped)
        lengths.append(len(loader))
        assert all(len(b) == 4 for b in loader)
    assert lengths == [3, 2] and loader.batches_consumed == 5


# ------------------------------------------------------------------------------------ node trees
def seq(name: str, n: int, batch_size: int) -> SequenceDataset:
    return keyed_sequence(name, n, batch_size, seed=2)


def keys(loader: ChunkedDataLoader) -> list[list[str]]:
    return [b["__key__"] for b in loader]


def test_tree_chunks_are_windows_of_the_batch_stream() -> None:
    loader = ChunkedDataLoader(seq("a", 21, 3), chunk_size=3, rank=0, world_size=1)
    assert loader.chunks_per_pass == 3 and len(loader) == 3
    chunks = [keys(loader) for _ in range(5)]
    stream = [b for c in chunks for b in c]
    assert all(len(c) == 3 for c in chunks)
    assert sorted(k for b in stream[:7] for k in b) == sorted(f"a{i}" for i in range(21))  # epoch 0
    assert sorted(k for b in stream[7:14] for k in b) == sorted(f"a{i}" for i in range(21))  # epoch 1
    assert stream[:7] != stream[7:14]
    with pytest.raises(PrepError, match="cannot jump"):
        loader.set_chunk(9)


def test_tree_chunks_resume_exactly() -> None:
    def build() -> ChunkedDataLoader:
        blend = BlendDataset((seq("a", 10, 2), 1), (seq("b", 9, 3), 1), seed=4)
        return ChunkedDataLoader(blend, chunk_size=4, rank=0, world_size=1)

    ref_loader = build()
    reference = [b for _ in range(5) for b in keys(ref_loader)]
    for cut in random_cuts(len(reference), seed=3):
        first = build()
        head: list[list[str]] = []
        while len(head) < cut:
            for b in first:
                head.append(b["__key__"])
                if len(head) == cut:
                    break
        resumed = build()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert resumed.batches_consumed == cut
        rest = [b for _ in range(5 - resumed.chunk - (resumed.remaining == 0)) for b in keys(resumed)]
        assert head + rest == reference


def test_tree_without_chunks_honours_limit_per_epoch() -> None:
    loader = ChunkedDataLoader(seq("a", 20, 2), limit_batches=3, rank=0, world_size=1)
    e0, e1 = keys(loader), keys(loader)
    assert len(e0) == len(e1) == 3 and e0 != e1
    full = ChunkedDataLoader(seq("a", 20, 2), rank=0, world_size=1)
    assert len(full) == 10 and len(keys(full)) == 10


def trained_epochs(loader: ChunkedDataLoader, start: int, stop: int, save_at: int = -1) -> tuple[list, Any]:
    """A trainer's loop `for e in range(start, stop): loader.set_epoch(e); for batch in loader: ...`:
    (epoch, batch) pairs, and (epoch, JSON state) saved right after batch number `save_at`."""
    out: list[tuple[int, Any]] = []
    saved = None
    for e in range(start, stop):
        loader.set_epoch(e)
        for b in loader:
            out.append((e, b["__key__"] if isinstance(b, dict) else indices(b)))
            if len(out) == save_at:
                saved = (e, json.loads(json.dumps(loader.state_dict())))
    return out, saved


@pytest.mark.parametrize("kind", ["map", "tree"])
def test_a_trainer_resumed_at_a_chunks_last_batch_trains_each_chunk_once(kind: str) -> None:
    """Saved right after a chunk's last batch, then resumed by restarting the saved epoch (or starting
    the next one): the stream is the uninterrupted one. The next chunk was trained twice (map-style) or
    set_epoch raised 'cannot jump' (trees)."""

    def build() -> ChunkedDataLoader:
        if kind == "map":
            return ChunkedDataLoader(Counting(24), batch_size=2, chunk_size=3, rank=0, world_size=1)
        return ChunkedDataLoader(seq("a", 24, 2), chunk_size=3, rank=0, world_size=1)

    reference, _ = trained_epochs(build(), 0, 5)
    for cut in range(1, len(reference)):
        head, saved = trained_epochs(build(), 0, 5, save_at=cut)
        epoch, state = saved
        finished = cut % 3 == 0
        for start in (epoch, epoch + 1) if finished else (epoch,):
            resumed = build()
            resumed.load_state_dict(state)
            rest, _ = trained_epochs(resumed, start, 5)
            assert head[:cut] + rest == reference, f"cut {cut}, restarted at epoch {start}"
    stepped = build()  # a loop that stops at len() without running the loader out goes on with the next chunk
    steps = [b for _ in range(5) for _, b in zip(range(len(stepped)), stepped, strict=False)]
    assert [b["__key__"] if kind == "tree" else indices(b) for b in steps] == [b for _, b in reference]


@pytest.mark.parametrize("limit", [0, 0.0, 0.01])
def test_a_limit_of_no_batches_yields_none(limit: float) -> None:
    for loader in (
        ChunkedDataLoader(seq("a", 20, 2), limit_batches=limit, rank=0, world_size=1),
        ChunkedDataLoader(Counting(20), batch_size=2, limit_batches=limit, rank=0, world_size=1),
    ):
        assert len(loader) == 0
        assert [keys(loader) if loader.is_tree else list(loader) for _ in range(2)] == [[], []]
        assert loader.batches_consumed == 0 and loader.chunk == 2


def test_bad_arguments() -> None:
    with pytest.raises(PrepError, match="map-style datasets only"):
        ChunkedDataLoader(seq("a", 4, 2), batch_size=2, rank=0, world_size=1)
    with pytest.raises(PrepError, match="batch_size is required"):
        ChunkedDataLoader(Counting(4), rank=0, world_size=1)
    with pytest.raises(PrepError, match="chunk_size"):
        ChunkedDataLoader(Counting(4), 2, chunk_size=0, rank=0, world_size=1)
    with pytest.raises(PrepError, match="no len"):
        ChunkedDataLoader(iter(range(3)), 2, rank=0, world_size=1)
    endless = BlendDataset((seq("a", 4, 2), 1), repeat=True)  # was a bare TypeError, at the first iter()
    for limit in (None, 0.5):
        with pytest.raises(PrepError, match=r"no fixed number of batches per epoch.*EpochizeDataset"):
            ChunkedDataLoader(endless, limit_batches=limit, rank=0, world_size=1)
    assert len(ChunkedDataLoader(endless, limit_batches=3, rank=0, world_size=1)) == 3


@pytest.mark.slow  # the first torch.optim use in a process imports torch._dynamo (~2 s)
def test_chunked_training_example_trains_on_every_sample_once() -> None:
    trained = runpy.run_path(str(EXAMPLES / "chunked_training.py"), run_name="not_main")["main"](
        train_size=60, val_size=16, batch_size=4, train_chunk_size=4
    )
    assert sorted(trained) == list(range(60)) and set(trained.values()) == {1}


def test_a_rank_left_without_samples_is_refused() -> None:
    with pytest.raises(PrepError, match="a rank would get none"):
        ChunkedDataLoader(Counting(9), batch_size=2, rank=0, world_size=4)  # 9 % 8 = 1 sample for 4 ranks
    assert len(ChunkedDataLoader(Counting(9), batch_size=2, drop_last=True, rank=0, world_size=4)) == 1


def test_chunks_over_real_shards(tmp_path: Path) -> None:
    from prep.formats.index import write_index
    from prep.formats.tar_write import write_shard
    from prep.loaders import ShardDataset

    for s, n in enumerate([7, 6, 8]):
        samples = [(f"k{s}_{r:02d}", {"txt": f"{s} {r}".encode()}) for r in range(n)]
        write_index(tmp_path / f"{s}.tar", write_shard(tmp_path / f"{s}.tar", samples, fsync=False).offsets)

    def build(workers: int = 0) -> ChunkedDataLoader:
        ds = ShardDataset(
            str(tmp_path), batch_size=4, seed=3, decode="raw", fields=["txt"], world_size=1, rank=0
        )
        return ChunkedDataLoader(ds, chunk_size=2, num_workers=workers, rank=0, world_size=1)

    loader = build()
    assert loader.chunks_per_pass == 3  # 21 samples, 6 batches of 4 (last one short)
    chunks = [keys(loader) for _ in range(3)]
    seen = [k for c in chunks for b in c for k in b]
    assert sorted(seen) == sorted(f"k{s}_{r:02d}" for s, n in enumerate([7, 6, 8]) for r in range(n))
    cut = build()
    head = keys(cut)
    it = iter(cut)
    head.append(next(it)["__key__"])
    resumed = build(workers=2)  # workers read the shards; the order and the cursor stay the same
    resumed.load_state_dict(json.loads(json.dumps(cut.state_dict())))
    assert head + keys(resumed) + keys(resumed) == [b for c in chunks for b in c]


def test_chunked_loader_is_freed_without_the_cyclic_gc() -> None:
    assert freed_without_gc(lambda: ChunkedDataLoader(Counting(8), 2, 2, rank=0, world_size=1))
