"""The DataLoader leaves the trainer's RNG alone, honours a node's set_epoch, refuses old states, goes on
at a batch that failed (the first one too), and reads a batch that spans more shards than it keeps open;
a SequenceDataset refuses a batch size that is not a positive int."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from prep.errors import PrepError
from prep.loaders import DataLoader, MapDataset, SequenceDataset, ShardDataset
from prep.loaders.base import STATE_VERSION
from prep.loaders.io import sources
from prep.testing.loader_data import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fix") / "data"
    make_shards(folder, [12, 12])
    return folder


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["__key__"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_torch_global_generator_alone(shards, workers):
    loader = DataLoader(ShardDataset(shards, batch_size=4, seed=1, world_size=1, rank=0), num_workers=workers)
    torch.manual_seed(123)
    before = torch.random.get_rng_state().clone()
    _keys(loader)
    _keys(loader)
    assert torch.equal(torch.random.get_rng_state(), before)


def _seq(n=10):
    return SequenceDataset([{"x": i} for i in range(n)], 2, shuffle=True, seed=3, world_size=1)


def test_node_set_epoch_before_iterating_sticks():
    ds = _seq()
    loader = DataLoader(ds)
    first = [int(x) for b in loader for x in b["x"]]  # epoch 0, the cursor moves to epoch 1
    ds.set_epoch(5)
    got = [int(x) for b in loader for x in b["x"]]
    want = [int(x) for b in DataLoader(_fresh_at(5)) for x in b["x"]]
    assert got == want and got != first
    # a loop broken mid-epoch still resumes at what was consumed, not where the sampler planned to
    it = iter(loader)
    next(it)
    it.close()
    rest = [int(x) for b in loader for x in b["x"]]
    assert rest == [int(x) for b in DataLoader(_fresh_at(6)) for x in b["x"]][2:]


def _fresh_at(epoch):
    ds = _seq()
    ds.set_epoch(epoch)
    return ds


def test_state_of_an_older_version_is_refused_saying_why():
    loader = DataLoader(_seq())
    state = loader.state_dict()
    assert state["version"] == STATE_VERSION == 2
    state["version"] = 1
    with pytest.raises(PrepError, match="older prep, whose random streams"):
        DataLoader(_seq()).load_state_dict(state)


def test_chunked_map_style_loader_leaves_torch_global_generator_alone():
    from prep.loaders import ChunkedDataLoader

    loader = ChunkedDataLoader(list(range(20)), batch_size=4, chunk_size=2, num_workers=1, rank=0,
                               world_size=1)
    torch.manual_seed(5)
    before = torch.random.get_rng_state().clone()
    assert len([b for b in loader]) == 2
    assert torch.equal(torch.random.get_rng_state(), before)


def test_simplejpeg_is_the_default_decoder_and_pillow_the_fallback(monkeypatch):
    import numpy as np

    from prep.loaders.io import images
    from prep.testing.loader_data import jpeg_bytes

    assert images.jpeg_backend() == "simplejpeg"  # a default dependency now
    data = jpeg_bytes(3, size=32)
    fast = images.decode_image(data, (16, 16), "center", 0, "x")
    monkeypatch.setattr(images, "simplejpeg", None)
    assert images.jpeg_backend() == "pil"
    slow = images.decode_image(data, (16, 16), "center", 0, "x")
    assert fast.shape == slow.shape == (16, 16, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 8  # both IDCT-downscale, then resize


# ---------------------------------------------------------------------------------------- messages
def test_state_mismatch_names_the_changed_field_at_any_depth():
    from prep.loaders import BlendDataset

    def blend(child_seed):
        a = SequenceDataset([{"x": i} for i in range(8)], 2, shuffle=True, seed=1, world_size=1)
        b = SequenceDataset([{"x": i} for i in range(8)], 2, shuffle=True, seed=child_seed, world_size=1)
        return BlendDataset((a, 0.5), (b, 0.5), seed=0)

    state = DataLoader(blend(1)).state_dict()
    with pytest.raises(PrepError) as err:
        DataLoader(blend(2)).load_state_dict(state)
    assert "children.1.seed: 1 -> 2" in str(err.value)
    assert "children.0" not in str(err.value)


def test_corrupt_image_error_names_key_and_shard_not_a_memory_address(tmp_path):
    from prep.formats.index import write_index
    from prep.formats.tar_write import write_shard
    from prep.testing.loader_data import jpeg_bytes

    good = jpeg_bytes(1)
    info = write_shard(tmp_path / "bad.tar", [("k0", {"jpg": good}), ("k1", {"jpg": b"\x89PNG not really"})],
                       fsync=False)
    write_index(tmp_path / "bad.tar", info.offsets)
    ds = ShardDataset(tmp_path / "bad.tar", batch_size=2, shuffle=False, world_size=1, rank=0,
                      image_size=16, on_error="raise")
    with pytest.raises(PrepError) as err:
        next(iter(DataLoader(ds)))
    msg = str(err.value)
    assert "'k1'" in msg and "bad.tar" in msg and "cannot decode image" in msg
    assert "object at 0x" not in msg


def test_fingerprint_has_manifest_checksums_a_moved_copy_resumes_another_dataset_does_not(shards, tmp_path):
    import shutil

    from prep.formats.manifest import read_manifest

    assert all(s.checksum for s in read_manifest(shards).shards)
    state = DataLoader(ShardDataset(shards, batch_size=4, world_size=1, rank=0)).state_dict()
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    DataLoader(ShardDataset(moved, batch_size=4, world_size=1, rank=0)).load_state_dict(state)
    other = tmp_path / "other"
    make_shards(other, [12, 12], image_size=8)  # same names and counts, other bytes
    with pytest.raises(PrepError, match="shards:"):
        DataLoader(ShardDataset(other, batch_size=4, world_size=1, rank=0)).load_state_dict(state)


def test_chunked_states_of_an_older_version_are_refused():
    from prep.loaders import ChunkedDataLoader, ChunkedSampler

    sampler = ChunkedSampler(10, 5, rank=0, world_size=1)
    state = {**sampler.state_dict(), "version": 1}
    with pytest.raises(PrepError, match="older prep"):
        ChunkedSampler(10, 5, rank=0, world_size=1).load_state_dict(state)
    loader = ChunkedDataLoader(list(range(10)), batch_size=2, chunk_size=2, rank=0, world_size=1)
    with pytest.raises(PrepError, match="older prep"):
        loader.load_state_dict({**loader.state_dict(), "version": 1})


def _fail_once(marker: str, bad_key: str | None, batch: dict) -> dict:
    """A map that raises once, on the batch holding `bad_key` (the marker file tells workers it did)."""
    if bad_key in batch["__key__"] and not os.path.exists(marker):
        open(marker, "w").close()
        raise PrepError("the map failed", "test", "nothing to fix")
    return batch


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("at", [0, 1, 4])
def test_a_failed_batch_is_where_the_loader_and_its_state_go_on(shards, tmp_path, workers, at):
    """A batch that fails (the very first one included, before anything was consumed) is not lost:
    iterating again starts at it, and so does a loader restored from `state_dict()` taken after the
    error, whatever the workers had planned ahead."""
    def loader(bad_key=None, marker=""):
        ds = ShardDataset(shards, batch_size=4, seed=1, world_size=1, rank=0)
        return DataLoader(MapDataset(ds, functools.partial(_fail_once, marker, bad_key)), num_workers=workers)

    ref = [list(b["__key__"]) for b in loader()]
    failing = loader(ref[at][0], str(tmp_path / "failed"))
    got = []
    with pytest.raises(PrepError, match="the map failed"):
        for b in failing:
            got.append(list(b["__key__"]))
    assert got == ref[:at] and failing.batches_consumed == at
    restored = loader()
    restored.load_state_dict(failing.state_dict())
    assert [list(b["__key__"]) for b in restored] == ref[at:]
    assert [list(b["__key__"]) for b in failing] == ref[at:]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_over_more_shards_than_are_kept_open_reads_them_all(tmp_path, monkeypatch, workers):
    """Each worker keeps `_OPEN_FILES` shard files open; a batch that spans more must keep all of its
    own open until it is read (closing the oldest mid-batch closed a descriptor the batch then read:
    EBADF, or another shard's bytes once the number was reused), and the limit holds after it."""
    make_shards(tmp_path / "d", [3] * 12)
    ds = ShardDataset(tmp_path / "d", batch_size=12, seed=2, world_size=1, rank=0)
    ref = [list(b["txt"]) for b in DataLoader(ds)]
    monkeypatch.setattr(sources, "_OPEN_FILES", 4)  # forked workers inherit it
    ds = ShardDataset(tmp_path / "d", batch_size=12, seed=2, world_size=1, rank=0)
    assert [list(b["txt"]) for b in DataLoader(ds, num_workers=workers)] == ref
    assert len({k for b in ref for k in b}) == 36
    if workers == 0:
        assert len(ds.reader._fds) <= 4


@pytest.mark.parametrize("batch_size", [0, 1.5, "2", True])
def test_a_sequence_batch_size_that_is_not_a_positive_int_is_refused_in_one_line(batch_size):
    """A float or string batch size failed later, while iterating, with a bare TypeError."""
    with pytest.raises(PrepError, match=r"SequenceDataset: batch_size .* must be a positive integer"):
        SequenceDataset([1, 2, 3], batch_size)
