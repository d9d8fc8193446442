"""Exact resume for every combinator and for nested trees: a run cut at random batches, its state sent
through JSON and restored into a fresh tree (0 or 2 workers) continues with exactly the batches the
uninterrupted run had."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from prep.errors import PrepError
from prep.formats.index import write_index
from prep.formats.tar_write import write_shard
from prep.loaders import (
    BlendDataset,
    ConcatDataset,
    DataLoader,
    EpochizeDataset,
    MapDataset,
    MixBatchDataset,
    SequenceDataset,
    ShardDataset,
    Source,
)
from prep.testing.loader_data import freed_without_gc
from prep.testing.loader_data import keyed_sequence as seq


def signature(batch: Any) -> tuple[Any, ...]:
    """What identifies a batch: its keys, and the sources the combinators tagged."""
    return tuple(batch["__key__"]), tuple(batch.get("__source__", ()))


def take(loader: Any, n: int) -> list[tuple[Any, ...]]:
    """The next n batches, running on across epoch ends. A pass may be empty once (a state saved right
    after an epoch's last batch resumes into that epoch's end); two empty passes in a row end it."""
    out: list[tuple[Any, ...]] = []
    empty = 0
    while len(out) < n and empty < 2:
        before = len(out)
        for batch in loader:
            out.append(signature(batch))
            if len(out) == n:
                break
        empty = empty + 1 if len(out) == before else 0
    return out


def check_resume(build: Callable[[], Any], total: int, cuts: list[int], workers: int = 0) -> list[tuple]:
    """Uninterrupted `total` batches == first `cut` + (JSON state -> fresh tree with `workers`) the rest."""
    reference = take(DataLoader(build(), rank=0, world_size=1), total)
    assert len(reference) == total
    for cut in cuts:
        first = DataLoader(build(), rank=0, world_size=1)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        second = DataLoader(build(), num_workers=workers, rank=0, world_size=1)
        second.load_state_dict(state)
        assert second.batches_consumed == cut
        assert head + take(second, total - cut) == reference, f"resume at batch {cut} diverged"
    return reference


def cuts_for(total: int, seed: int, k: int = 3) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, total), k))


def blend_random() -> Any:
    return BlendDataset((seq("a", 13, 2), 0.6), (seq("b", 9, 3, seed=1), 0.4), seed=7)


def blend_smooth_repeat() -> Any:
    return EpochizeDataset(
        BlendDataset((seq("a", 5, 2), 2), (seq("b", 7, 2), 1), seed=3, schedule="smooth", repeat=True), 7
    )


def mix_multinomial() -> Any:
    return EpochizeDataset(
        MixBatchDataset((seq("a", 11, 1), 1), (seq("b", 6, 1), 2), batch_size=4, seed=5, world_size=1), 6
    )


def mix_stratified_finite() -> Any:
    return MixBatchDataset(
        (seq("a", 13, 1), 3),
        (seq("b", 9, 1), 1),
        batch_size=5,
        counts="stratified",
        repeat=False,
        world_size=1,
    )


def concat() -> Any:
    return ConcatDataset(seq("a", 5, 2), seq("b", 7, 3), seq("c", 3, 2))


def maps() -> Any:
    return ConcatDataset(
        MapDataset(seq("a", 6, 2), _double), MapDataset(seq("b", 5, 2), _tag_sample, per_sample=True)
    )


def nested() -> Any:
    """A blend of mixes of concats, with a map, an epochize and per-source sample weights."""
    mix1 = MixBatchDataset(
        (ConcatDataset(seq("a", 7, 1), seq("b", 5, 1)), 2),
        (seq("c", 9, 1, seed=4), 1),
        batch_size=3,
        counts="stratified",
        seed=1,
        world_size=1,
    )
    mix2 = MixBatchDataset(
        Source(
            ConcatDataset(seq("d", 4, 1), MapDataset(seq("e", 6, 1), _tag_sample, per_sample=True)),
            1,
            name="de",
        ),
        Source(seq("f", 5, 1), 1, sample_weight=0.5),
        batch_size=2,
        seed=2,
        world_size=1,
    )
    return EpochizeDataset(
        BlendDataset((mix1, 0.5), Source(mix2, 0.5, name="m2", sample_weight=2.0), seed=9, repeat=True), 8
    )


def _double(batch: dict[str, Any]) -> dict[str, Any]:
    batch["x"] = batch["x"] * 2
    return batch


def _tag_sample(sample: dict[str, Any]) -> dict[str, Any]:
    sample["x"] = sample["x"] + 1000
    return sample


@pytest.mark.parametrize(
    "build,total",
    [
        (blend_random, 14),
        (blend_smooth_repeat, 21),
        (mix_multinomial, 18),
        (mix_stratified_finite, 10),
        (concat, 18),
        (maps, 12),
        (nested, 24),
    ],
)
def test_exact_resume_every_combinator(build: Callable[[], Any], total: int) -> None:
    reference = check_resume(build, total, cuts_for(total, seed=total))
    assert len(set(reference)) > 1


def test_nested_tree_runs_and_tags_sources_and_weights() -> None:
    loader = DataLoader(nested(), rank=0, world_size=1)
    batches = [b for _, b in zip(range(8), loader, strict=False)]
    assert len(batches) == 8  # one virtual epoch
    sources = {s for b in batches for s in b["__source__"]}
    assert {s.split("/")[0] for s in sources} == {"0", "m2"}
    expected = {"0": 1.0, "m2/de": 2.0, "m2/1": 0.5 * 2.0}  # outer x inner sample weights
    for b in batches:
        for s, w in zip(b["__source__"], b["__weight__"].tolist(), strict=True):
            assert w == pytest.approx(expected["0" if s.startswith("0/") else s])


def test_a_sample_weight_below_the_root_gives_every_batch_its_weight_key() -> None:
    """Only an inner blend or mix has a sample_weight: batches (and samples) of the other branches carry
    `__weight__` 1.0 too. A blend's other branches had no such key (a KeyError on some batches), and a mix
    of mixes raised 'batches have different fields'."""

    def inner_blend() -> Any:
        return BlendDataset(Source(seq("a", 8, 2), 1, sample_weight=2.0), (seq("b", 8, 2), 1), seed=1)

    def inner_mix() -> Any:
        return MixBatchDataset(Source(seq("a", 8, 1), 1, sample_weight=2.0), (seq("b", 8, 1), 1),
                               batch_size=2, counts="stratified", world_size=1)

    trees = [
        BlendDataset((inner_blend(), 1), (seq("c", 8, 2), 1), seed=2),
        BlendDataset((EpochizeDataset(inner_mix(), 3), 1), (MapDataset(seq("c", 8, 2), _double), 1), seed=2),
        EpochizeDataset(MixBatchDataset((inner_mix(), 1), (seq("c", 8, 1), 1), batch_size=4,
                                        counts="stratified", world_size=1), 4),
    ]
    for tree in trees:
        batches = list(DataLoader(tree, rank=0, world_size=1))
        assert {s.split("/")[0] for b in batches for s in b["__source__"]} == {"0", "1"}
        for b in batches:
            weights = {k[0]: w for k, w in zip(b["__key__"], b["__weight__"].tolist(), strict=True)}
            assert all(w == (2.0 if k == "a" else 1.0) for k, w in weights.items())


def test_nested_resume_with_two_workers() -> None:
    check_resume(nested, 24, [11], workers=2)


def test_state_is_small_json_and_refuses_another_setup() -> None:
    loader = DataLoader(nested(), rank=0, world_size=1)
    take(loader, 5)
    state = loader.state_dict()
    assert len(json.dumps(state)) < 4000  # cursors only, no sample lists
    other = DataLoader(
        EpochizeDataset(BlendDataset((seq("a", 5, 1), 1), (seq("b", 5, 1), 2), seed=9, repeat=True), 8),
        rank=0,
        world_size=1,
    )
    with pytest.raises(PrepError, match="another dataset setup"):
        other.load_state_dict(state)


def test_sibling_streams_differ() -> None:
    """Two identical sub-blends under one parent draw from different streams (their tree paths differ)."""

    def sub() -> BlendDataset:
        return BlendDataset(
            (seq("a", 50, 1, shuffle=False), 1), (seq("b", 50, 1, shuffle=False), 1), seed=1, repeat=True
        )

    parent = ConcatDataset(EpochizeDataset(sub(), 30), EpochizeDataset(sub(), 30))
    loader = DataLoader(parent, rank=0, world_size=1)
    seqs = [s[1] for s in take(loader, 60)]
    assert seqs[:30] != seqs[30:]


def test_elastic_resume_on_another_world_size_with_the_same_global_batch() -> None:
    """Saved on 2 ranks (per-rank batch 2), resumed on 1 rank (per-rank batch 4): the same global stream."""

    def build(world: int) -> Any:
        per_rank = 4 // world
        leaves = [
            SequenceDataset(
                [{"__key__": f"{n}{i}", "x": torch.tensor([i])} for i in range(30)],
                per_rank,
                shuffle=True,
                seed=1,
                world_size=world,
            )
            for n in "ab"
        ]
        mix = MixBatchDataset(
            (leaves[0], 1), (leaves[1], 1), batch_size=per_rank, counts="stratified", world_size=world
        )
        c = SequenceDataset([{"__key__": f"c{i}", "x": torch.tensor([i])} for i in range(40)], per_rank,
                            shuffle=True, world_size=world)
        return BlendDataset((mix, 1), (c, 1), seed=3, repeat=True)

    reference = take(DataLoader(build(1), rank=0, world_size=1), 12)
    ranks = [DataLoader(build(2), rank=r, world_size=2) for r in range(2)]
    parts = [take(loader, 5) for loader in ranks]
    head = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(*parts, strict=True)]
    resumed = DataLoader(build(1), rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(ranks[0].state_dict())))
    assert head + take(resumed, 7) == reference


def _rows(name: str, n: int, world: int, seed: int = 0) -> SequenceDataset:
    rows = [{"__key__": f"{name}{i}", "x": torch.tensor([i])} for i in range(n)]
    return SequenceDataset(rows, 8 // world, shuffle=True, seed=seed, world_size=world)


ELASTIC_TREES: dict[str, Callable[[int], Any]] = {
    "concat": lambda w: ConcatDataset(_rows("a", 21, w), _rows("b", 19, w, 1)),
    "exhaust blend": lambda w: BlendDataset((_rows("a", 40, w), 2), (_rows("b", 24, w, 1), 1), seed=3,
                                            mode="exhaust"),
    "mix of a concat": lambda w: MixBatchDataset((ConcatDataset(_rows("a", 13, w), _rows("c", 9, w)), 2),
                                                 (_rows("b", 18, w, 1), 1), batch_size=8 // w,
                                                 counts="stratified", repeat=False, world_size=w),
    "blend of a mix": lambda w: BlendDataset(
        (MixBatchDataset((_rows("a", 30, w), 2), (_rows("b", 18, w, 1), 1), batch_size=8 // w, repeat=False,
                         world_size=w), 1), (_rows("c", 16, w, 2), 1), mode="exhaust"),
}


def _global_epoch(loaders: list[DataLoader]) -> list[tuple[str, ...]]:
    """The rest of the epoch, all ranks in lockstep: each global batch as its ranks' keys joined."""
    return [tuple(k for b in parts for k in b["__key__"]) for parts in zip(*loaders, strict=True)]


@pytest.mark.parametrize("name", list(ELASTIC_TREES))
def test_elastic_resume_from_4_ranks_on_2_or_8_sees_every_sample_once(name: str) -> None:
    """Saved on 4 ranks at batch k (0, inside, the last), resumed on 2 and on 8 (same global batch of 8):
    the global stream is the uninterrupted one and the epoch holds every sample exactly once."""
    build = ELASTIC_TREES[name]
    reference = _global_epoch([DataLoader(build(1), rank=0, world_size=1)])
    every = sorted(k for b in reference for k in b)
    assert len(every) == len(set(every))
    for k in (0, len(reference) // 2, len(reference)):
        ranks = [DataLoader(build(4), rank=r, world_size=4) for r in range(4)]
        its = [iter(loader) for loader in ranks]
        head = [tuple(key for it in its for key in next(it)["__key__"]) for _ in range(k)]
        state = json.loads(json.dumps(ranks[0].state_dict()))
        for world in (2, 8):
            resumed = [DataLoader(build(world), rank=r, world_size=world) for r in range(world)]
            for loader in resumed:
                loader.load_state_dict(state)
            assert head + _global_epoch(resumed) == reference, f"saved at {k}, resumed on {world}"


def test_ranks_whose_slice_of_the_final_batch_is_empty_get_the_empty_batch() -> None:
    """10 samples in global batches of 8 on 4 ranks: the final batch of 2 leaves ranks 2 and 3 without a
    sample. Every rank gets as many batches as the others (an empty one there) and the epoch holds every
    sample once; a SequenceDataset (and a per-sample map over it) raised IndexError from default_collate."""

    def build(rank: int) -> list[Any]:
        rows = [{"__key__": f"a{i}", "x": torch.tensor([i])} for i in range(10)]
        return [SequenceDataset(rows, 2, shuffle=True, world_size=4),
                MapDataset(SequenceDataset(rows, 2, world_size=4), _tag_sample, per_sample=True)]

    for k in range(2):
        per_rank = [[b["__key__"] for b in DataLoader(build(r)[k], rank=r, world_size=4)] for r in range(4)]
        assert [len(p) for p in per_rank] == [2] * 4
        assert per_rank[2][1] == per_rank[3][1] == []
        assert sorted(key for p in per_rank for b in p for key in b) == sorted(f"a{i}" for i in range(10))


def test_a_sequence_or_mix_planned_for_another_world_size_is_refused_in_one_line() -> None:
    """Planned for 1 rank (batch_size 4), loaded on 2: each rank got 2 samples, not its batch_size of 4,
    silently (ShardDataset refused it already)."""
    rows = [{"__key__": f"a{i}", "x": torch.tensor([i])} for i in range(16)]
    for ds in (SequenceDataset(rows, 4, world_size=1),
               MixBatchDataset((SequenceDataset(rows, 1, world_size=1), 1), batch_size=4, world_size=1)):
        with pytest.raises(PrepError, match="planned for a world of 1 ranks, the loader runs 2"):
            next(iter(DataLoader(ds, rank=0, world_size=2)))


def test_same_object_twice_is_refused() -> None:
    a = seq("a", 4, 1)
    with pytest.raises(PrepError, match="appears twice"):
        BlendDataset((a, 1), (a, 1))


# ------------------------------------------------------------------------------ real shard leaves
def shard_folder(root: Path, prefix: str, sizes: list[int]) -> Path:
    folder = root / prefix
    for s, n in enumerate(sizes):
        samples = [
            (f"{prefix}{s}_{r:03d}", {"txt": f"{prefix} {s} {r}".encode(), "cls": str(r).encode()})
            for r in range(n)
        ]
        info = write_shard(folder / f"{prefix}-{s:04d}.tar", samples, fsync=False)
        write_index(folder / f"{prefix}-{s:04d}.tar", info.offsets)
    return folder


def shards(folder: Path, batch_size: int, seed: int) -> ShardDataset:
    return ShardDataset(
        str(folder), batch_size=batch_size, seed=seed, decode="raw", fields=["txt"], rank=0, world_size=1
    )


def test_nested_shard_leaves_resume_exactly(tmp_path: Path) -> None:
    a = shard_folder(tmp_path, "a", [6, 5, 7])
    b = shard_folder(tmp_path, "b", [4, 4])
    c = shard_folder(tmp_path, "c", [9])

    def build() -> Any:
        mix = MixBatchDataset(
            (ConcatDataset(shards(a, 1, 1), shards(b, 1, 2)), 2),
            (shards(c, 1, 3), 1),
            batch_size=4,
            counts="stratified",
            seed=4,
            world_size=1,
        )
        return EpochizeDataset(BlendDataset((mix, 0.7), (shards(b, 3, 5), 0.3), seed=8, repeat=True), 10)

    reference = check_resume(build, 25, cuts_for(25, seed=1))
    assert check_resume(build, 25, [13], workers=2) == reference
    keys = [k for batch, _ in reference for k in batch]
    assert {k[0] for k in keys} == {"a", "b", "c"}


def test_concat_of_shards_covers_every_sample_once_per_epoch(tmp_path: Path) -> None:
    a = shard_folder(tmp_path, "a", [6, 5])
    b = shard_folder(tmp_path, "b", [4, 3])
    loader = DataLoader(ConcatDataset(shards(a, 4, 0), shards(b, 4, 0)), rank=0, world_size=1)
    assert len(loader) == 3 + 2
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == sorted(
        [f"a{s}_{r:03d}" for s, n in enumerate([6, 5]) for r in range(n)]
        + [f"b{s}_{r:03d}" for s, n in enumerate([4, 3]) for r in range(n)]
    )
    assert all(k.startswith("a") for k in keys[:11])


def test_set_epoch_after_a_break_keeps_the_consumed_position_with_workers() -> None:
    """Workers plan ahead; set_epoch(current) after breaking out must not skip the prefetched batches."""
    loader = DataLoader(ConcatDataset(seq("a", 40, 2, shuffle=False)), num_workers=2, rank=0, world_size=1)
    it = iter(loader)
    got = [next(it)["__key__"] for _ in range(3)]
    del it
    loader.set_epoch(0)  # the usual per-epoch call, after a mid-epoch stop
    assert got == [["a0", "a1"], ["a2", "a3"], ["a4", "a5"]]
    assert next(iter(loader))["__key__"] == ["a6", "a7"]


def test_loader_is_freed_without_the_cyclic_gc() -> None:
    """No loader <-> sampler cycle: persistent workers are shut down by refcounting, not a late GC pass."""
    assert freed_without_gc(lambda: DataLoader(seq("a", 8, 2), rank=0, world_size=1))
