"""ShardDataset: sources, decoding, epoch policy, ranks, state and errors, on real generated shards."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from prep.errors import PrepError
from prep.formats.index import index_path
from prep.loaders import DataLoader, ShardDataset, rank_slice
from prep.testing.loader_data import jpeg_bytes, make_shards, planned_keys

SIZES = [7, 5, 9, 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    keys = make_shards(root, SIZES, npy=True, wdinfo=True)
    return root, keys


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["__key__"]]


# ---------------------------------------------------------------------------------------------- sources
def test_sources_agree_on_the_samples(shards, tmp_path):
    root, keys = shards
    idx_only = tmp_path / "idx_only"
    no_idx = tmp_path / "no_idx"
    for d in (idx_only, no_idx):
        d.mkdir()
    for i in range(len(SIZES)):
        name = f"shard-{i:05d}.tar"
        shutil.copy(root / name, idx_only / name)
        shutil.copy(index_path(root / name), index_path(idx_only / name))
        shutil.copy(root / name, no_idx / name)
    sources = [
        root,
        idx_only,
        no_idx,
        root / "wdinfo.pkl",
        str(root / "shard-{00000..00003}.tar"),
        [str(root / f"shard-{i:05d}.tar") for i in range(4)],
    ]
    for src in sources:
        ds = ShardDataset(src, batch_size=4, decode="raw", shuffle=False, rank=0, world_size=1)
        assert ds.total == sum(SIZES)
        assert planned_keys(ds) == keys, src


def test_folder_without_wdinfo_permission_never_unpickles(shards, tmp_path):
    root, _ = shards
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(root / "shard-00000.tar", folder)
    (folder / "wdinfo.pkl").write_bytes(b"\x80\x04cos\nsystem\n.")  # would run code if unpickled
    ds = ShardDataset(folder, batch_size=2, decode="raw", rank=0, world_size=1)
    assert ds.total == SIZES[0]
    with pytest.raises(PrepError, match="only plain data"):
        ShardDataset(folder / "wdinfo.pkl", batch_size=2, rank=0, world_size=1)


def test_pipe_needs_opt_in(shards):
    root, keys = shards
    url = f"pipe:cat {root / 'shard-00001.tar'}"
    with pytest.raises(PrepError, match="allow_pipe=True"):
        ShardDataset(url, batch_size=2, rank=0, world_size=1)
    ds = ShardDataset(url, batch_size=2, decode="raw", shuffle=False, allow_pipe=True, rank=0, world_size=1)
    assert planned_keys(ds) == keys[7:12]


def test_missing_and_duplicate_shards_are_named(shards, tmp_path):
    root, _ = shards
    with pytest.raises(PrepError, match="shard not found"):
        ShardDataset(tmp_path / "nope.tar", batch_size=2, rank=0, world_size=1)
    with pytest.raises(PrepError, match="listed twice"):
        ShardDataset([root / "shard-00000.tar", root / "shard-00000.tar"], batch_size=2, rank=0, world_size=1)


def test_index_that_does_not_match_the_tar_is_reported(shards, tmp_path):
    root, _ = shards
    shutil.copy(root / "shard-00000.tar", tmp_path / "a.tar")
    offsets = np.fromfile(index_path(root / "shard-00000.tar"), dtype="<u8").copy()
    offsets[1:-1] += 512  # every sample but the first now starts mid-sample
    offsets.tofile(index_path(tmp_path / "a.tar"))
    ds = ShardDataset(tmp_path / "a.tar", batch_size=7, decode="raw", shuffle=False, rank=0, world_size=1,
                      on_error="raise")
    with pytest.raises(PrepError, match=r"\.idx|rebuild"):
        ds.fetch(ds.next_batch(), 0, 1)
    # skipping (the default) gives up once more than max_skip_fraction of the samples are unreadable
    ds = ShardDataset(tmp_path / "a.tar", batch_size=7, decode="raw", shuffle=False, rank=0, world_size=1)
    with pytest.raises(PrepError, match=r"max_skip_fraction.*\.idx"):
        list(DataLoader(ds))


# --------------------------------------------------------------------------------------------- decoding
def test_decoded_fields(shards):
    root, _ = shards
    ds = ShardDataset(
        root, batch_size=5, decode="uint8", image_size=(8, 12), shuffle=False, rank=0, world_size=1
    )
    b = ds.fetch(ds.next_batch(), 0, 1)
    assert b["jpg"].shape == (5, 3, 8, 12) and b["jpg"].dtype == torch.uint8
    assert b["txt"][0] == "caption s00000_000000\twith a tab"  # a str, tab kept
    assert b["json"][2] == {"key": "s00000_000002", "shard": 0, "row": 2}
    assert b["npy"].shape == (5, 4) and b["npy"][3, 0].item() == 3.0
    flt = ShardDataset(root, batch_size=5, decode="float", image_size=8, shuffle=False, rank=0, world_size=1)
    f = flt.fetch(flt.next_batch(), 0, 1)["jpg"]
    assert f.dtype == torch.float32 and f.min() >= 0.0 and f.max() <= 1.0
    raw = ShardDataset(root, batch_size=5, decode="raw", shuffle=False, rank=0, world_size=1)
    r = raw.fetch(raw.next_batch(), 0, 1)
    assert r["jpg"][0][:2] == b"\xff\xd8" and isinstance(r["txt"][0], bytes)


def test_image_matches_reference_decode(shards):
    """Native size: the decoded pixels equal Pillow's decode of the same bytes (within IDCT rounding)."""
    import io

    from PIL import Image

    root, _ = shards
    ds = ShardDataset(root, batch_size=1, decode="uint8", shuffle=False, rank=0, world_size=1)
    got = ds.fetch(ds.next_batch(), 0, 1)["jpg"][0].permute(1, 2, 0).numpy()
    ref = np.asarray(Image.open(io.BytesIO(jpeg_bytes(0))).convert("RGB"))
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 8


def test_resize_crop_and_pil_modes(tmp_path):
    from prep.formats.tar_write import write_shard

    wide = jpeg_bytes(1, 64)
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(wide)).resize((64, 32))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_shard(tmp_path / "w.tar", [("a", {"png": buf.getvalue(), "txt": b"x"})])
    for crop in ("center", "random"):
        ds = ShardDataset(
            tmp_path / "w.tar", batch_size=1, decode="uint8", image_size=16, crop=crop, rank=0, world_size=1
        )
        assert ds.fetch(ds.next_batch(), 0, 1)["png"].shape == (1, 3, 16, 16)
    pil = ShardDataset(tmp_path / "w.tar", batch_size=1, decode="pil", rank=0, world_size=1)
    assert pil.fetch(pil.next_batch(), 0, 1)["png"][0].size == (64, 32)


def test_fields_alternatives_and_missing_field(shards):
    root, _ = shards
    ds = ShardDataset(root, batch_size=3, decode="raw", fields=["png|jpg", "txt"], rank=0, world_size=1)
    b = ds.fetch(ds.next_batch(), 0, 1)
    assert set(b) == {"__key__", "png", "txt"}
    bad = ShardDataset(root, batch_size=3, decode="raw", fields=["cls"], rank=0, world_size=1,
                       on_error="raise")
    with pytest.raises(PrepError, match=r"shard-0000\d\.tar sample \d+ \(key .*\): sample .* has no cls"):
        bad.fetch(bad.next_batch(), 0, 1)


def test_different_image_sizes_without_image_size_is_a_clear_error(tmp_path):
    from prep.formats.tar_write import write_shard

    write_shard(tmp_path / "m.tar", [("a", {"jpg": jpeg_bytes(0, 16)}), ("b", {"jpg": jpeg_bytes(0, 24)})])
    ds = ShardDataset(tmp_path / "m.tar", batch_size=2, decode="uint8", rank=0, world_size=1)
    with pytest.raises(PrepError, match="image_size"):
        ds.fetch(ds.next_batch(), 0, 1)


def test_transform_and_collate_hooks(shards):
    root, _ = shards

    def transform(s):
        s["n"] = len(s["txt"])
        return s

    ds = ShardDataset(
        root, batch_size=4, decode="uint8", image_size=8, transform=transform, rank=0, world_size=1
    )
    b = ds.fetch(ds.next_batch(), 0, 1)
    assert b["n"].tolist() == [len(t) for t in b["txt"]]
    ds2 = ShardDataset(
        root, batch_size=4, decode="raw", collate=lambda ss: [s["__key__"] for s in ss], rank=0, world_size=1
    )
    assert len(ds2.fetch(ds2.next_batch(), 0, 1)) == 4


# ----------------------------------------------------------------------------------------- epoch policy
def test_drop_last_false_covers_everything_with_a_short_last_batch(shards):
    root, keys = shards
    ds = ShardDataset(root, batch_size=5, decode="raw", seed=3, window_shards=2, rank=0, world_size=1)
    assert ds.batches_per_epoch() == 5 and ds.dropped_per_epoch == 0
    got = planned_keys(ds)
    assert sorted(got) == sorted(keys) and len(got) == 25
    assert ds.state_dict() == {"epoch": 1, "position": 0}  # the epoch end advanced the cursor


def test_drop_last_true_drops_and_reports_the_tail(shards):
    root, _ = shards
    ds = ShardDataset(root, batch_size=4, decode="raw", drop_last=True, rank=0, world_size=1)
    assert ds.batches_per_epoch() == 6 and ds.dropped_per_epoch == 1
    e0 = planned_keys(ds)
    e1 = planned_keys(ds)
    assert len(e0) == len(set(e0)) == 24 and len(e1) == 24
    assert e0 != e1  # a new epoch, a new order


def test_ranks_split_each_global_batch_disjointly(shards):
    root, keys = shards
    per_rank = []
    for r in range(3):
        ds = ShardDataset(root, batch_size=2, decode="raw", seed=5, rank=r, world_size=3)
        per_rank.append(planned_keys(ds, r, 3))
    flat = [k for ks in per_rank for k in ks]
    assert sorted(flat) == sorted(keys) and len(flat) == len(set(flat))
    # the tail (25 % 6 = 1 sample) goes to rank 0; the other ranks get an empty slice, not padding
    assert [len(k) for k in per_rank] == [9, 8, 8]


def test_rank_slice_is_even():
    assert [rank_slice(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_world_mismatch_between_dataset_and_loader_is_an_error(shards):
    root, _ = shards
    ds = ShardDataset(root, batch_size=2, decode="raw", rank=0, world_size=2)
    with pytest.raises(PrepError, match="world of 2"):
        ds.fetch(ds.next_batch(), 0, 1)


def test_next_samples_and_fetch_samples_for_mixing(shards):
    root, _ = shards
    ds = ShardDataset(root, batch_size=4, decode="uint8", image_size=8, seed=1, rank=0, world_size=1)
    ds.bind("")
    refs = ds.next_samples(3)
    samples = ds.fetch_samples(refs)
    assert [set(s) for s in samples] == [{"__key__", "jpg", "txt", "json", "npy"}] * 3
    assert samples[0]["jpg"].shape == (3, 8, 8) and isinstance(samples[0]["txt"], str)
    assert ds.state_dict()["position"] == 3
    ds.next_samples(21)
    with pytest.raises(StopIteration):
        ds.next_samples(2)  # 1 left: not enough, so the epoch ends
    assert ds.state_dict() == {"epoch": 1, "position": 0}


# ----------------------------------------------------------------------------------- loader and state
@pytest.mark.slow
def test_workers_do_not_change_the_order_and_state_resumes(shards):
    root, keys = shards

    def loader(workers):
        return DataLoader(
            ShardDataset(root, batch_size=3, decode="uint8", image_size=8, seed=7, rank=0, world_size=1),
            num_workers=workers,
        )

    ref = [b["__key__"] for b in loader(0)]
    two = loader(2)
    got = []
    for i, b in enumerate(two):
        got.append(b["__key__"])
        if i == 3:
            state = json.loads(json.dumps(two.state_dict()))  # JSON round trip
            break
    assert got == ref[:4]
    fresh = loader(2)
    fresh.load_state_dict(state)
    assert [b["__key__"] for b in fresh] == ref[4:]
    assert sorted(k for b in ref for k in b) == sorted(keys)


def test_set_epoch_and_fingerprint_mismatch(shards):
    root, _ = shards
    ds = ShardDataset(root, batch_size=4, decode="raw", seed=1, rank=0, world_size=1)
    dl = DataLoader(ds, rank=0, world_size=1)
    dl.set_epoch(3)
    first = next(iter(dl))["__key__"]
    again = ShardDataset(root, batch_size=4, decode="raw", seed=1, rank=0, world_size=1)
    again.set_epoch(3)
    assert again.fetch(again.next_batch(), 0, 1)["__key__"] == first
    state = dl.state_dict()
    assert state["tree"] == {"epoch": 3, "position": 4}
    other = DataLoader(
        ShardDataset(root, batch_size=4, decode="raw", seed=2, rank=0, world_size=1), rank=0, world_size=1
    )
    with pytest.raises(PrepError, match=r"seed: 1 -> 2"):
        other.load_state_dict(state)
    fp = ds.fingerprint()
    assert len(json.dumps(fp)) < 400 and "shard-00000" not in json.dumps(fp)


def test_token_never_shows(shards):
    root, _ = shards
    secret = "tok-SECRET-123"
    ds = ShardDataset(root, batch_size=2, decode="raw", token=secret, rank=0, world_size=1)
    assert secret not in repr(ds) and secret not in repr(ds.reader.token)
    assert secret not in json.dumps(ds.fingerprint())
    assert secret not in " ".join(sys.argv)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux-only")
def test_worker_result_pipe_is_enlarged(shards):
    import fcntl

    root, _ = shards
    dl = DataLoader(
        ShardDataset(root, batch_size=4, decode="raw", rank=0, world_size=1),
        num_workers=1,
        persistent_workers=True,
        rank=0,
        world_size=1,
    )
    next(iter(dl))
    reader = dl._torch._iterator._worker_result_queue._reader
    assert fcntl.fcntl(reader.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032)) >= 1 << 20


def test_set_epoch_of_the_current_epoch_keeps_a_restored_mid_epoch_cursor(shards):
    """The usual loop calls set_epoch(e) after load_state_dict: it must not rewind to the epoch start."""
    root, _ = shards

    def make():
        return DataLoader(ShardDataset(root, batch_size=4, decode="raw", seed=5, rank=0, world_size=1),
                          rank=0, world_size=1)

    ref = [b["__key__"] for b in make()]
    dl = make()
    it = iter(dl)
    head = [next(it)["__key__"] for _ in range(3)]
    state = dl.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # same epoch: keeps the cursor
    assert head + [b["__key__"] for b in resumed] == ref
    resumed.set_epoch(1)  # another epoch: starts it from its first batch
    assert len([b for b in resumed]) == len(ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_per_fetch_changes_neither_order_nor_state(shards, workers):
    """Several batches per worker request: the state after batch i (even mid-group) is the same."""
    root, _ = shards

    def make(k):
        ds = ShardDataset(root, batch_size=3, decode="raw", seed=9, rank=0, world_size=1)
        return DataLoader(ds, num_workers=workers, batches_per_fetch=k, rank=0, world_size=1)

    one, three = make(1), make(3)
    it1, it3 = iter(one), iter(three)
    for _ in range(4):  # stop inside the second group of three
        assert next(it1)["__key__"] == next(it3)["__key__"]
    assert one.state_dict() == three.state_dict()
    state = three.state_dict()
    del it1, it3
    resumed = make(3)
    resumed.load_state_dict(state)
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in one]
