"""MapDataset: batch-level and per-sample functions, in workers, under a mix, and the clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from prep.errors import PrepError
from prep.loaders import (
    BlendDataset,
    ConcatDataset,
    DataLoader,
    MapDataset,
    MixBatchDataset,
    SequenceDataset,
    ShardDataset,
)
from prep.testing.loader_data import keyed_sequence, make_shards


def seq(name: str, n: int, batch_size: int) -> SequenceDataset:
    return keyed_sequence(name, n, batch_size, seed=5)


def add_total(batch: dict) -> dict:
    batch["total"] = batch["x"].sum()
    return batch


def square(sample: dict) -> dict:
    sample["x"] = sample["x"] ** 2
    return sample


def test_batch_fn_sees_each_loaded_batch() -> None:
    for workers in (0, 2):
        loader = DataLoader(MapDataset(seq("a", 10, 4), add_total), num_workers=workers, rank=0, world_size=1)
        batches = list(loader)
        assert [len(b["x"]) for b in batches] == [4, 4, 2]
        assert all(int(b["total"]) == int(b["x"].sum()) for b in batches)


def test_per_sample_fn_before_collation_and_under_a_mix() -> None:
    loader = DataLoader(MapDataset(seq("a", 6, 3), square, per_sample=True), rank=0, world_size=1)
    for b in loader:
        assert b["x"].flatten().tolist() == [int(k[1:]) ** 2 for k in b["__key__"]]
    mix = MixBatchDataset(
        (MapDataset(seq("a", 8, 1), square, per_sample=True), 1),
        (seq("b", 8, 1), 1),
        batch_size=4,
        counts="stratified",
        world_size=1,
    )
    batch = next(iter(DataLoader(mix, rank=0, world_size=1)))
    for k, x in zip(batch["__key__"], batch["x"].flatten().tolist(), strict=True):
        assert x == (int(k[1:]) ** 2 if k.startswith("a") else int(k[1:]))


def same(sample: dict) -> dict:
    return sample


def as_plain(batch: Any) -> Any:
    """A batch as comparable data: tensors by values, dtype and memory layout (strides)."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", batch.tolist(), str(batch.dtype), batch.stride())
    if isinstance(batch, dict):
        return {k: as_plain(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return [as_plain(v) for v in batch]
    return batch


def keys_only(samples: list[dict]) -> dict:
    return {"keys": [s["__key__"] for s in samples]}


def test_an_identity_per_sample_map_gives_the_childs_own_batches(tmp_path: Path) -> None:
    """The mapped samples are collated as the child collates: a leaf's collation (shards: json as a list
    of dicts, images channels_last; a custom collate_fn), a mix's batch_mix_fn and padding. The map used
    torch's default_collate instead: json became a dict of tensors, images lost channels_last, a mix of
    differently sized tensors raised, and batch_mix_fn=list was ignored."""
    make_shards(tmp_path, [5, 4])

    def rows(name: str, width: int) -> SequenceDataset:
        samples = [{"__key__": f"{name}{i}", "x": torch.full((width,), i)} for i in range(6)]
        return SequenceDataset(samples, 1, world_size=1)

    builds = [
        lambda: ShardDataset(tmp_path, batch_size=3, seed=1, rank=0, world_size=1),
        lambda: SequenceDataset([{"__key__": str(i)} for i in range(5)], 2, collate_fn=keys_only,
                                world_size=1),
        lambda: MixBatchDataset((rows("a", 2), 1), (rows("b", 3), 1), batch_size=4, counts="stratified",
                                repeat=False, world_size=1),
        lambda: MixBatchDataset((rows("a", 2), 1), batch_size=2, batch_mix_fn=list, repeat=False,
                                world_size=1),
    ]
    for build in builds:  # both under a map, so the child has one tree path (and order)
        batches = [[as_plain(b) for b in DataLoader(MapDataset(build(), same, per_sample=each), world_size=1)]
                   for each in (False, True)]
        assert batches[1] == batches[0] and len(batches[0]) > 1


def plus_one(sample: dict) -> dict:
    sample["x"] = sample["x"] + 1
    return sample


def test_per_sample_maps_stack() -> None:
    """A per-sample map over a per-sample map (also through a concat) maps each sample by both, inner
    first; it raised 'cannot be loaded sample by sample' at the first batch (under a mix it worked)."""
    stacked = [
        MapDataset(MapDataset(seq("a", 7, 2), plus_one, per_sample=True), square, per_sample=True),
        MapDataset(ConcatDataset(MapDataset(seq("a", 7, 2), plus_one, per_sample=True), seq("b", 3, 2)),
                   square, per_sample=True),
    ]
    for tree in stacked:
        for b in DataLoader(tree, rank=0, world_size=1):
            for k, x in zip(b["__key__"], b["x"].flatten().tolist(), strict=True):
                assert x == (int(k[1:]) + (k[0] == "a")) ** 2


def test_map_keeps_the_childs_state_and_length() -> None:
    ds = MapDataset(seq("a", 10, 3), add_total)
    loader = DataLoader(ds, rank=0, world_size=1)
    assert len(loader) == 4
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["tree"] == {"child": {"epoch": 0, "pos": 3}}


def test_per_sample_over_a_blend_is_refused_with_a_fix() -> None:
    blend = BlendDataset((seq("a", 4, 2), 1), (seq("b", 4, 2), 1), seed=0)
    loader = DataLoader(MapDataset(blend, square, per_sample=True), rank=0, world_size=1)
    with pytest.raises(PrepError, match="below blends"):
        next(iter(loader))


def test_fn_must_be_callable() -> None:
    with pytest.raises(PrepError, match="not callable"):
        MapDataset(seq("a", 4, 2), "upper")  # type: ignore[arg-type]
