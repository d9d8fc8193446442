"""Recycled shared-memory batch slots: batches from workers equal in-process ones, a batch the trainer
still holds is never overwritten by a recycled slot, and slots really are reused."""

import pytest
import torch

from prep.loaders import DataLoader, ShardDataset
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
