"""Recycled shared-memory batch slots: batches from workers equal in-process ones, a batch the trainer
still holds is never overwritten by a recycled slot, and slots really are reused."""

import pytest
import torch

from prep.loaders import DataLoader, MapDataset, ShardDataset
from prep.loaders.io import shm
from prep.testing.loader_data import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    make_shards(root, [40, 40, 40, 40], npy=True, image_size=24, distinct_images=13)
    return root


def _dataset(root, decode="uint8"):
    return ShardDataset(root, batch_size=4, seed=3, decode=decode, image_size=16, crop="random")


@pytest.mark.parametrize("decode", ["uint8", "float"])
def test_held_batches_survive_slot_reuse(shards, decode):
    reference = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}
        for b in DataLoader(_dataset(shards, decode), num_workers=0)
    ]
    before = set(shm._MAIN_SLOTS)
    held = []
    got = 0
    for i, batch in enumerate(DataLoader(_dataset(shards, decode), num_workers=2)):
        ref = reference[i]
        assert batch["__key__"] == ref["__key__"]
        assert torch.equal(batch["jpg"], ref["jpg"]) and torch.equal(batch["npy"], ref["npy"])
        if i % 3 == 0:  # held past many later batches (and past running out of slots)
            held.append((i, batch))
        got += 1
    assert got == len(reference) == 40
    for i, batch in held:
        assert torch.equal(batch["jpg"], reference[i]["jpg"]), f"held batch {i} was overwritten"
        assert torch.equal(batch["npy"], reference[i]["npy"])
    assert batch["jpg"].is_contiguous(memory_format=torch.channels_last) or decode == "float"
    # the slots came back to the main process once each, not one segment per batch
    assert 0 < len(set(shm._MAIN_SLOTS) - before) <= 2 * shm._SLOTS_PER_WORKER


def test_slot_states_follow_handouts():
    slots = shm._WorkerSlots()
    a = slots.take(100)
    b = slots.take(100)
    assert a is not None and b is not None and a is not b
    a.state[0] = 0  # what the main process does when the last tensor viewing slot a is freed
    again = slots.take(50)
    assert again is a and a.gen == 2
    for _ in range(shm._SLOTS_PER_WORKER - 2):
        assert slots.take(10) is not None
    assert slots.take(10) is None  # every slot handed out: the caller falls back to a fresh segment
    b.state[0] = 0
    grown = slots.take(100_000)  # a free slot too small for the request is regrown in place
    assert grown is not None and grown.cap == 1 << 17 and grown.index == b.index


def test_raw_batches_cross_as_slot_references(shards):
    reference = list(DataLoader(ShardDataset(shards, batch_size=4, seed=3, decode="raw"), num_workers=0))
    got = list(DataLoader(ShardDataset(shards, batch_size=4, seed=3, decode="raw"), num_workers=2))
    assert got == reference
    assert all(type(b["jpg"]) is list and all(type(x) is bytes for x in b["jpg"]) for b in got)


def test_slot_bytes_pickle_as_a_reference_unless_changed():
    from multiprocessing.reduction import ForkingPickler

    buf = shm._pooled(torch.arange(10, dtype=torch.uint8), shm._WorkerSlots().take(10))
    items = [bytes(range(2, 5)), bytes(range(6, 9))]
    kept = shm.bytes_list(buf, list(items), [2, 5, 6, 9])
    assert kept == items and kept.__reduce_ex__(5)[0] is shm._bytes_from_slot
    changed = shm.bytes_list(buf, list(items), [2, 5, 6, 9])
    changed[0] = b"other"
    assert ForkingPickler.loads(ForkingPickler.dumps(changed)) == [b"other", items[1]]
    assert shm.bytes_list(torch.zeros(3, dtype=torch.uint8), items, [0, 1]) is items  # not a slot


@pytest.fixture(scope="module")
def plain_shards(tmp_path_factory):
    """jpg + txt + json only: batches take the plain path, decoded into `shared_rows`' views."""
    root = tmp_path_factory.mktemp("pool_plain")
    make_shards(root, [40, 40, 40, 38], image_size=16, distinct_images=13)
    return root


@pytest.mark.parametrize("size", [None, 8])
def test_plain_batches_in_reused_slot_views_equal_in_process_ones_and_survive_reuse(plain_shards, size):
    """Two epochs with persistent workers: every slot's cached views are handed out again many times,
    and the last batch of each epoch is shorter (views of another shape). Batches the trainer holds
    keep their pixels."""
    def dataset():
        return ShardDataset(plain_shards, batch_size=8, seed=5, image_size=size)

    reference = []
    in_process = DataLoader(dataset(), num_workers=0)
    for epoch in range(2):
        in_process.set_epoch(epoch)
        reference += [{**b, "jpg": b["jpg"].clone()} for b in in_process]
    loader = DataLoader(dataset(), num_workers=2, persistent_workers=True)
    held, i = [], 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            ref = reference[i]
            assert batch["__key__"] == ref["__key__"] and batch["txt"] == ref["txt"]
            assert torch.equal(batch["jpg"], ref["jpg"])
            assert batch["jpg"].is_contiguous(memory_format=torch.channels_last)
            if i % 3 == 0:
                held.append((i, batch))
            i += 1
    assert i == len(reference) == 2 * 20 and reference[19]["jpg"].shape[0] == 6
    for k, batch in held:
        assert torch.equal(batch["jpg"], reference[k]["jpg"]), f"held batch {k} was overwritten"


def _with_views(batch: dict) -> dict:
    """Runs in the worker: plain tensors viewing the batch's slot (operations on a slot view give plain
    tensors), as a map that wants HWC images or a crop of the batch would make."""
    return {**batch, "hwc": batch["jpg"].permute(0, 2, 3, 1), "first": batch["jpg"][:1]}


def test_views_made_in_the_worker_survive_slot_reuse_when_held_alone(plain_shards):
    """The trainer keeps only a view the worker made of the batch tensor (not the batch tensor): the slot
    stays handed out until that view dies, so its pixels never change."""
    def dataset():
        return MapDataset(ShardDataset(plain_shards, batch_size=8, seed=5), _with_views)

    reference = [{k: b[k].clone() for k in ("hwc", "first")} for b in DataLoader(dataset(), num_workers=0)]
    held, i = [], 0
    for batch in DataLoader(dataset(), num_workers=1, batches_per_fetch=1):
        assert all(torch.equal(batch[k], reference[i][k]) for k in ("hwc", "first"))
        held.append((i, batch["hwc"] if i % 2 else batch["first"]))
        del batch
        i += 1
    assert i == len(reference) == 20
    for k, view in held:
        want = reference[k]["hwc"] if k % 2 else reference[k]["first"]
        assert torch.equal(view, want), f"the view held from batch {k} changed after it was handed out"


def test_shared_rows_reuses_a_slots_views_for_the_same_shape_and_pickles_each_handout(monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a worker
    monkeypatch.setattr(shm, "_WORKER_SLOTS", shm._WorkerSlots())
    rows, batch = shm.shared_rows(3, 4, 5)
    assert rows.shape == (3, 4, 5, 3) and batch.shape == (3, 3, 4, 5)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    rows[...] = 9
    assert (batch == 9).all()  # one memory
    slot = batch._prep_slot
    first_gen = slot.gen
    slot.state[0] = 0  # released by the main process
    again_rows, again = shm.shared_rows(3, 4, 5)
    assert again is batch and again_rows is rows and again._prep_gen == slot.gen == first_gen + 1
    fn, args = shm._reduce_pooled(again)
    assert fn is shm._rebuild_pooled and args[2] == slot.gen
    assert args[4] == (shm._HEADER, (3, 3, 4, 5), batch.stride(), torch.uint8)
    slot.state[0] = 0
    other_rows, other = shm.shared_rows(2, 4, 5)  # another shape: new views of the same slot
    assert other is not batch and other._prep_slot is slot and other.shape == (2, 3, 4, 5)
    assert other_rows.shape == (2, 4, 5, 3) and other_rows is not rows
    assert shm._reduce_pooled(other)[1][4][1] == (2, 3, 4, 5)
