"""ConcatDataset: order, lengths, epoch ends, resume inside a later part (energon restarts at the first
dataset; prep must not), and use under a mix without losing samples at part boundaries."""

from __future__ import annotations

import json

from prep.loaders import ConcatDataset, DataLoader, MixBatchDataset, SequenceDataset
from prep.testing.loader_data import keyed_sequence


def seq(name: str, n: int, batch_size: int, shuffle: bool = False) -> SequenceDataset:
    return keyed_sequence(name, n, batch_size, seed=1, shuffle=shuffle)


def build() -> ConcatDataset:
    return ConcatDataset(seq("a", 5, 2), seq("b", 7, 3), seq("c", 2, 2))


def test_children_in_order_then_epoch_end() -> None:
    loader = DataLoader(build(), rank=0, world_size=1)
    assert len(loader) == 3 + 3 + 1
    batches = [b["__key__"] for b in loader]
    assert batches == [
        ["a0", "a1"],
        ["a2", "a3"],
        ["a4"],
        ["b0", "b1", "b2"],
        ["b3", "b4", "b5"],
        ["b6"],
        ["c0", "c1"],
    ]
    assert [b["__key__"] for b in loader] == batches  # unshuffled: the next epoch repeats the order


def test_resume_mid_concat_continues_in_the_later_part() -> None:
    first = DataLoader(build(), rank=0, world_size=1)
    it = iter(first)
    for _ in range(4):  # a0a1, a2a3, a4, b0b1b2: stop inside part 1
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["tree"]["k"] == 1
    resumed = DataLoader(build(), rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert [b["__key__"] for b in resumed] == [["b3", "b4", "b5"], ["b6"], ["c0", "c1"]]


def test_shuffled_parts_reshuffle_each_epoch_and_cover_everything() -> None:
    loader = DataLoader(
        ConcatDataset(seq("a", 9, 2, shuffle=True), seq("b", 4, 2, shuffle=True)), rank=0, world_size=1
    )
    e0 = [k for b in loader for k in b["__key__"]]
    e1 = [k for b in loader for k in b["__key__"]]
    assert sorted(e0) == sorted(e1) == sorted([f"a{i}" for i in range(9)] + [f"b{i}" for i in range(4)])
    assert e0 != e1 and all(k.startswith("a") for k in e0[:9])


def test_concat_under_a_mix_crosses_part_boundaries_without_dropping_samples() -> None:
    cat = ConcatDataset(seq("a", 5, 1), seq("b", 3, 1))
    mix = MixBatchDataset((cat, 1), batch_size=3, world_size=1)
    loader = DataLoader(mix, rank=0, world_size=1)
    keys = [k for _, b in zip(range(2), loader, strict=False) for k in b["__key__"]]
    assert keys == ["a0", "a1", "a2", "a3", "a4", "b0"]  # the second batch spans both parts
    cat.bind("")
    cat.load_state_dict({"epoch": 0, "k": 1, "children": [{"epoch": 1, "pos": 0}, {"epoch": 0, "pos": 1}]})
    assert [k for k, _ in cat.next_samples(2)] == [1, 1]
    try:  # one sample left in the whole concat, three asked: the epoch ends, as a leaf's does
        cat.next_samples(3)
        raise AssertionError("expected StopIteration")
    except StopIteration:
        assert cat.state_dict()["k"] == 0 and cat.epoch == 1
