"""No shared-memory slot leaks: every decode mode, a map that returns new objects, the raw path's
fallback for unusual tars, and requests that fail, each over 1,000 batches from a real worker. A leaked
slot stays handed out forever; after six, every batch would fall back to a fresh segment, which the
worker counts (`fresh`). Private torch APIs each have a fallback, tested by removing the attribute."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import torch

from prep.errors import PrepError
from prep.formats.index import write_index
from prep.loaders import DataLoader, MapDataset, ShardDataset
from prep.loaders.io import shm, torch_private
from prep.testing.loader_data import jpeg_bytes, make_shards

BATCHES = 1000
SHM_BOUND = 64 << 20  # far above what the slots of one worker hold for batches of two 8x8 images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks") / "data"
    make_shards(root, [50, 50], image_size=8)
    return root


@pytest.fixture(scope="module")
def pax_shard(tmp_path_factory):
    """A tar whose members carry pax headers: the raw fast path declines it after taking its slot."""
    path = tmp_path_factory.mktemp("pax") / "pax.tar"
    offsets = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            offsets.append(tf.offset)
            for ext, data in (("jpg", jpeg_bytes(i, 8)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                info.pax_headers = {"comment": "x" * 10}
                tf.addfile(info, io.BytesIO(data))
        offsets.append(tf.offset)
    write_index(path, offsets)
    return path


def worker_stats(batch):
    """What the worker's slots look like after it made this batch (a batch-level map, so it runs there)."""
    slots = shm._WORKER_SLOTS
    stats = {"fresh": slots.fresh if slots else 0, "slots": len(slots.slots) if slots else 0}
    if isinstance(batch, dict):
        batch.update(stats)  # the batch's own tensors travel on
        return batch
    return stats


def to_new_objects(batch):
    """A map that returns new objects (decoded sizes), dropping the raw batch and its slot."""
    return worker_stats({"sizes": [len(b) for b in batch["jpg"]]})


_CALLS = [0]


def to_a_view(batch):
    """A map that sends a view of the batch tensor (a plain tensor) instead of the tensor itself."""
    return worker_stats({"hwc": batch["jpg"].permute(0, 2, 3, 1)})


def sometimes_fails(batch):
    _CALLS[0] += 1
    if _CALLS[0] % 10 == 0:
        raise PrepError("a request that fails now and then", "test map", "none")
    return worker_stats(batch)


def _run(dataset, fn, *, retry_errors=False):
    loader = DataLoader(MapDataset(dataset, fn), num_workers=1, batches_per_fetch=1, persistent_workers=True)
    shm = shutil.disk_usage("/dev/shm").used
    peak, got, last, errors = 0, 0, None, 0
    while got < BATCHES:
        try:
            for batch in loader:
                got += 1
                last = batch
                if got % 100 == 0:
                    peak = max(peak, shutil.disk_usage("/dev/shm").used - shm)
                if got >= BATCHES:
                    break
        except PrepError as err:
            if not retry_errors:
                raise
            assert str(err) == "test map: a request that fails now and then — fix: none"  # one line
            errors += 1
    return last, peak, errors


def _ds(source, decode, image_size=8):
    return ShardDataset(source, batch_size=2, seed=0, decode=decode, image_size=image_size, world_size=1,
                        rank=0)


@pytest.mark.parametrize(
    "case",
    ["uint8", "float", "raw", "raw + map to new objects", "uint8 + map to a view", "raw, unusual tar",
     "failing requests"],
)
def test_no_slot_leaks_over_1000_batches(shards, pax_shard, case):
    if case in ("uint8", "float", "raw"):
        last, peak, _ = _run(_ds(shards, case), worker_stats)
    elif case == "raw + map to new objects":
        last, peak, _ = _run(_ds(shards, "raw"), to_new_objects)
    elif case == "uint8 + map to a view":
        last, peak, _ = _run(_ds(shards, "uint8"), to_a_view)
    elif case == "raw, unusual tar":
        last, peak, _ = _run(_ds(pax_shard, "raw"), worker_stats)
    else:
        last, peak, errors = _run(_ds(shards, "uint8"), sometimes_fails, retry_errors=True)
        assert errors >= 50
    assert last["fresh"] == 0, last  # never ran out of slots: none leaked
    assert 0 < last["slots"] <= shm._SLOTS_PER_WORKER
    assert peak < SHM_BOUND, peak


# ------------------------------------------------------------------------ private torch API fallbacks
@pytest.mark.parametrize(
    "owner,name",
    [
        (torch._C, "_disabled_torch_function_impl"),
        (torch.multiprocessing.reductions, "reduce_tensor"),
    ],
)
def test_without_a_slot_api_workers_send_fresh_segments(shards, monkeypatch, owner, name):
    reference = [b["jpg"].clone() for b in DataLoader(_ds(shards, "uint8"), num_workers=0)]
    monkeypatch.delattr(owner, name)
    assert not torch_private.slots_supported()
    got = [b["jpg"] for b in DataLoader(_ds(shards, "uint8"), num_workers=1)]
    assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_without_new_shared_a_public_shared_segment_serves(monkeypatch):
    fast = torch_private.new_shared((3, 4), torch.float32)
    assert fast.is_shared() and fast.shape == (3, 4)
    monkeypatch.delattr(torch.TypedStorage, "_new_shared")
    slow = torch_private.new_shared((3, 4), torch.float32)
    assert slow.is_shared() and slow.shape == (3, 4) and slow.dtype == torch.float32


def test_without_the_result_queue_attribute_the_pipe_is_left_alone():
    class Iterator:  # a torch iterator of another version: no _worker_result_queue
        pass

    assert torch_private.result_pipe_reader(Iterator()) is None
    from prep.loaders.dataloader import _grow_result_pipe

    _grow_result_pipe(Iterator())  # a no-op, not an AttributeError
