"""The DataLoader leaves the trainer's RNG alone, honours a node's set_epoch, and refuses old states."""

from __future__ import annotations

import pytest
import torch

from prep.errors import PrepError
from prep.loaders import DataLoader, SequenceDataset, ShardDataset
from prep.loaders.base import STATE_VERSION
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

    from prep.loaders import decode
    from prep.testing.loader_data import jpeg_bytes

    assert decode.jpeg_backend() == "simplejpeg"  # a default dependency now
    data = jpeg_bytes(3, size=32)
    fast = decode.decode_image(data, (16, 16), "center", 0, "x")
    monkeypatch.setattr(decode, "simplejpeg", None)
    assert decode.jpeg_backend() == "pil"
    slow = decode.decode_image(data, (16, 16), "center", 0, "x")
    assert fast.shape == slow.shape == (16, 16, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 8  # both IDCT-downscale, then resize
