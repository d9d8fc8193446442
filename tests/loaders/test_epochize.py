"""EpochizeDataset: fixed-size virtual epochs over a stream that is never restarted by them."""

from __future__ import annotations

import json

import pytest

from prep.errors import PrepError
from prep.loaders import BlendDataset, DataLoader, EpochizeDataset, SequenceDataset
from prep.testing.loader_data import keyed_sequence


def seq(name: str, n: int, batch_size: int) -> SequenceDataset:
    return keyed_sequence(name, n, batch_size, seed=3)


def test_virtual_epochs_have_length_batches_and_continue_the_stream() -> None:
    loader = DataLoader(EpochizeDataset(seq("a", 10, 2), 3), rank=0, world_size=1)
    assert len(loader) == 3
    epochs = [[k for b in loader for k in b["__key__"]] for _ in range(5)]
    assert all(len(e) == 6 for e in epochs[:1])
    flat = [k for e in epochs for k in e]
    assert sorted(flat[:10]) == sorted(f"a{i}" for i in range(10))  # first real epoch: each sample once
    assert sorted(flat[10:20]) == sorted(f"a{i}" for i in range(10))  # the child wrapped into its next epoch
    assert flat[:10] != flat[10:20]


def test_set_epoch_moves_only_the_virtual_counter() -> None:
    ds = EpochizeDataset(seq("a", 10, 2), 2)
    loader = DataLoader(ds, rank=0, world_size=1)
    first = [b["__key__"] for b in loader]
    loader.set_epoch(7)
    second = [b["__key__"] for b in loader]
    keys = {k for batch in first + second for k in batch}
    assert ds.epoch == 8 and second != first
    assert keys <= {f"a{i}" for i in range(10)} and len(keys) == 8  # 8 distinct: no restart, no repeat


def test_resume_inside_a_virtual_epoch_over_an_endless_blend() -> None:
    def build() -> EpochizeDataset:
        return EpochizeDataset(BlendDataset((seq("a", 7, 2), 1), (seq("b", 5, 1), 1), seed=2, repeat=True), 5)

    ref = DataLoader(build(), rank=0, world_size=1)
    reference = [b["__key__"] for _ in range(3) for b in ref]
    cut = DataLoader(build(), rank=0, world_size=1)
    head = [b["__key__"] for b in cut]
    it = iter(cut)
    head += [next(it)["__key__"] for _ in range(2)]
    resumed = DataLoader(build(), rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(cut.state_dict())))
    rest = [b["__key__"] for b in resumed] + [b["__key__"] for b in resumed]
    assert head + rest == reference


def test_bad_length_and_empty_child() -> None:
    with pytest.raises(PrepError, match="positive number of batches"):
        EpochizeDataset(seq("a", 4, 2), 0)
    ds = EpochizeDataset(SequenceDataset([{"x": 1}], 2, drop_last=True, world_size=1), 2)
    ds.bind("")
    with pytest.raises(PrepError, match="no batches"):
        ds.next_batch()
