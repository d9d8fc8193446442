"""Planning at scale: the global stream is the same at 1, 8 and 1,024 ranks (ranks simulated in one
process, each loading its slice from the one descriptor), and a descriptor does not grow with the
world size (a range, or a mix's counts and ranges; each rank computes its own references)."""

import pickle

import pytest

from prep.loaders import BlendDataset, EpochizeDataset, MixBatchDataset, SequenceDataset, ShardDataset
from prep.loaders.base import Planned, slice_refs
from prep.testing.loader_data import make_shards

GLOBAL = 1024
SIZES = [256] * 8  # two global batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "ds"
    make_shards(root, SIZES, image_size=8, distinct_images=2)
    return root


def _shards(folder, world, seed=3):
    return ShardDataset(folder, batch_size=GLOBAL // world, world_size=world, rank=0, seed=seed,
                        decode="raw", window_shards=3)


def _keys(samples):
    return {"__key__": [s["__key__"] for s in samples]}


def _blend(folder, world):
    words = SequenceDataset([{"__key__": f"w{i}"} for i in range(3072)], GLOBAL // world, shuffle=True,
                            seed=1, world_size=world, collate_fn=_keys)
    return BlendDataset((_shards(folder, world), 0.6), (words, 0.4), seed=5, epoch_batches=5)


def _mixed_keys(batches):
    return {"__key__": [b[0]["__key__"] for b in batches]}


def _mix(counts):
    """Three sources (a shard dataset and two in-memory lists, one of 300 that wraps into its next epoch
    inside most batches), four batches of the endless mix."""

    def make(folder, world):
        words = SequenceDataset([{"__key__": f"w{i}"} for i in range(300)], 1, shuffle=True, seed=1,
                                world_size=world)
        nums = SequenceDataset([{"__key__": f"n{i}"} for i in range(5000)], 1, shuffle=True, seed=2,
                               world_size=world)
        mix = MixBatchDataset((_shards(folder, world), 0.5), (words, 0.3), (nums, 0.2),
                              batch_size=GLOBAL // world, counts=counts, seed=4, world_size=world,
                              collate_fn=list, batch_mix_fn=_mixed_keys)
        return EpochizeDataset(mix, 4)

    return make


TREES = [_shards, _blend, _mix("multinomial"), _mix("stratified")]
IDS = ["shard", "blend", "mix", "mix-stratified"]


def _global_stream(ds, world):
    """Every rank's keys of each planned batch, rank by rank: the global stream as the ranks see it."""
    ds.bind("")
    out = []
    while True:
        try:
            desc = ds.next_batch()
        except StopIteration:
            return out
        batch = []
        for rank in range(world):
            batch += ds.fetch(desc, rank, world)["__key__"]
        assert len(batch) == GLOBAL
        out.append(batch)


@pytest.mark.parametrize("make", TREES, ids=IDS)
def test_the_global_stream_is_the_same_at_1_8_and_1024_ranks(folder, make):
    streams = {world: _global_stream(make(folder, world), world) for world in (1, 8, 1024)}
    assert streams[1] and len({k for b in streams[1] for k in b}) > GLOBAL  # real, varied batches
    assert streams[8] == streams[1]
    assert streams[1024] == streams[1]


def _leaf_desc(desc):
    """The descriptor a rank resolves: a leaf's or a mix's (a blend's wraps its source's)."""
    return desc if isinstance(desc.items, Planned) else _leaf_desc(desc.items[1])


@pytest.mark.parametrize("make", TREES, ids=IDS)
def test_a_descriptor_does_not_grow_with_the_world_and_a_rank_computes_only_its_slice(folder, make):
    sizes = {}
    for world in (1, 8, 1024):
        ds = make(folder, world)
        ds.bind("")
        desc = ds.next_batch()
        sizes[world] = len(pickle.dumps(desc))
        sent = pickle.loads(pickle.dumps(_leaf_desc(desc)))  # what a worker receives: the bare range
        leaf = ds.nodes()[sent.node]
        for rank in (0, world - 1):
            refs = slice_refs(leaf, sent.items, rank, world)
            assert len(refs) == GLOBAL // world
            assert refs == list(_leaf_desc(desc).items)[rank * len(refs) : (rank + 1) * len(refs)]
    assert max(sizes.values()) - min(sizes.values()) <= 16  # digits of the positions, nothing per rank
    assert max(sizes.values()) < 400
