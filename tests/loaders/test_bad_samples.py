"""Bad samples are skipped by default: dropped from their batch deterministically (so resume stays
exact), counted per reason and key in `loader.stats()`, warned about at most once a minute, and raised
beyond `max_skip_fraction` or with `on_error="raise"` (as the one-line PrepError, from a worker too)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from prep.errors import PrepError
from prep.formats.index import write_index
from prep.formats.tar_write import write_shard
from prep.loaders import DataLoader, LocalDataset, MapDataset, MixBatchDataset, SequenceDataset, ShardDataset
from prep.loaders.skips import BadSample
from prep.testing.loader_data import jpeg_bytes

pytestmark = pytest.mark.filterwarnings("ignore:prep loader skipped")  # asserted where it matters

BAD = {"k005", "k017", "k031"}  # corrupt image
NO_TXT = {"k022"}  # a member missing (fields=["jpg", "txt"])
BAD_JSON = {"k040"}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    samples = []
    for i in range(60):
        key = f"k{i:03d}"
        members = {"jpg": b"\xff\xd8 not a jpeg" if key in BAD else jpeg_bytes(i, 12), "txt": key.encode(),
                   "json": b"{broken" if key in BAD_JSON else b"{}"}
        if key in NO_TXT:
            del members["txt"]
        samples.append((key, members))
    info = write_shard(root / "data.tar", samples, fsync=False)
    write_index(root / "data.tar", info.offsets)
    return root / "data.tar"


def _ds(shard, **kw):
    args = {"batch_size": 8, "seed": 1, "image_size": 8, "fields": ["jpg", "txt", "json"], "rank": 0,
            "world_size": 1, "max_skip_fraction": 0.2, **kw}
    return ShardDataset(shard, **args)


def _keys(loader, stop=None):
    out = []
    for b in loader:
        out.append(list(b["__key__"]))
        if len(out) == stop:
            break
    return out


@pytest.mark.parametrize("decode", ["uint8", "float", "raw", "pil"])
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_dropped_counted_and_warned_once(shard, decode, workers):
    loader = DataLoader(_ds(shard, decode=decode), num_workers=workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epochs = [_keys(loader), _keys(loader)]
    bad = NO_TXT if decode == "raw" else BAD | NO_TXT | BAD_JSON  # raw decodes nothing
    for batches in epochs:
        keys = [k for b in batches for k in b]
        assert sorted(keys) == sorted(f"k{i:03d}" for i in range(60) if f"k{i:03d}" not in bad)
        assert len(batches) == 8 and sum(len(b) < 8 for b in batches) >= 1
    stats = loader.stats()
    assert stats["skipped"] == 2 * len(bad)
    reasons = {"corrupt image": 2 * 3, "missing member": 2, "malformed member": 2}
    assert stats["by_reason"] == ({"missing member": 2} if decode == "raw" else reasons)
    assert all("data.tar" in name for name in stats["by_key"]) and len(stats["by_key"]) == len(bad)
    assert any(all(k in name for name in [n for n in stats["by_key"] if k in n]) for k in bad)
    skip_warnings = [w for w in caught if "bad sample" in str(w.message)]
    assert len(skip_warnings) == 1  # rate-limited: one a minute
    assert "loader.stats()" in str(skip_warnings[0].message)


def test_skips_are_deterministic_so_resume_is_exact(shard):
    full = _keys(DataLoader(_ds(shard), num_workers=2))
    first = DataLoader(_ds(shard), num_workers=2)
    head = _keys(first, stop=3)
    state = first.state_dict()
    resumed = DataLoader(_ds(shard), num_workers=1)
    resumed.load_state_dict(state)
    assert head + _keys(resumed) == full


def test_more_bad_samples_than_max_skip_fraction_raise(shard):
    with pytest.raises(PrepError, match=r"max_skip_fraction=0.05") as err:
        _keys(DataLoader(_ds(shard, max_skip_fraction=0.05), num_workers=1))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_on_error_raise_stops_at_the_first_bad_sample_in_one_line(shard, workers):
    loader = DataLoader(_ds(shard, on_error="raise", shuffle=False), num_workers=workers)
    with pytest.raises(PrepError, match=r"data.tar sample 5 \(key 'k005'\): cannot decode image") as err:
        _keys(loader)
    assert "Traceback" not in str(err.value)


def test_mixed_samples_are_skipped_too(shard):
    other = SequenceDataset([{"__key__": f"s{i}", "txt": "x"} for i in range(10)], 1, world_size=1)
    mix = MixBatchDataset((_ds(shard, fields=["txt"]), 1), (other, 1), batch_size=6,
                          counts="stratified", world_size=1, repeat=False, batch_mix_fn=list)
    loader = DataLoader(mix)
    seen = [s["__key__"][0] for _, b in zip(range(8), loader, strict=False) for s in b]
    assert "k022" not in seen and loader.stats()["by_reason"] == {"missing member": 1}


def _same(sample):
    return sample


def test_a_batch_whose_samples_were_all_skipped_is_empty_under_a_mix_and_a_per_sample_map(shard):
    """Per-rank batches of one: every bad sample leaves its batch empty. The mix's default batch_mix_fn
    raised 'batches of different types []' and a per-sample map's collate an IndexError."""
    fields = {"fields": ["jpg", "txt"], "shuffle": False, "batch_size": 1}
    other = SequenceDataset([{"__key__": "s", "jpg": torch.zeros(3, 8, 8, dtype=torch.uint8), "txt": "s"}], 1,
                            world_size=1)
    trees = [MixBatchDataset((_ds(shard, **fields), 1), (other, 1), batch_size=1, counts="stratified",
                             world_size=1, repeat=False),
             MapDataset(_ds(shard, **fields), _same, per_sample=True)]
    for tree in trees:
        loader = DataLoader(tree)
        keys = [k for b in loader for k in b["__key__"]]
        assert sorted(k for k in keys if k != "s") == sorted({f"k{i:03d}" for i in range(60)} - BAD - NO_TXT)
        assert loader.stats()["skipped"] == len(BAD | NO_TXT)


def test_bad_option_values_are_refused(shard):
    with pytest.raises(PrepError, match="skip or raise"):
        _ds(shard, on_error="ignore")
    with pytest.raises(PrepError, match=r"\[0, 1\]"):
        _ds(shard, max_skip_fraction=1.5)


# ---------------------------------------------------------------------------------------- LocalDataset
def _folder(tmp_path, n=30, bad=(3,)):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    lines = []
    for i in range(n):
        name = f"{i:03d}.png"
        if i in bad:
            (imgs / name).write_bytes(b"not an image at all")
        else:
            buf = io.BytesIO()
            Image.new("RGB", (16 + 8 * (i % 3), 16), (i, i, i)).save(buf, format="PNG")
            (imgs / name).write_bytes(buf.getvalue())
        lines.append(f"{name}\tcaption {i}\n")
    (tmp_path / "caps.txt").write_text("".join(lines))
    return imgs, tmp_path / "caps.txt"


def test_local_buckets_open_with_a_bad_image_and_skip_it(tmp_path):
    imgs, caps = _folder(tmp_path)
    ds = LocalDataset(imgs, caps, batch_size=4, buckets=[(16, 16), (16, 24), (16, 32)], world_size=1, rank=0)
    assert ds.total == 29
    with pytest.warns(RuntimeWarning, match="bad sample"):
        loader = DataLoader(ds)
    keys = [k for b in loader for k in b["__key__"]]
    assert sorted(keys) == sorted(f"{i:03d}.png" for i in range(30) if i != 3)
    stats = loader.stats()
    assert stats["by_reason"] == {"corrupt image": 1} and any("003.png" in k for k in stats["by_key"])
    with pytest.raises(PrepError, match=r"003.png.*caps.txt:4.*cannot read image header"):
        LocalDataset(imgs, caps, batch_size=4, buckets=True, world_size=1, rank=0, on_error="raise")


def test_local_unbucketed_skips_a_bad_image_while_loading(tmp_path):
    imgs, caps = _folder(tmp_path, bad=(3, 11))
    loader = DataLoader(LocalDataset(imgs, caps, batch_size=4, image_size=16, world_size=1, rank=0,
                                     max_skip_fraction=0.1), num_workers=1)
    with pytest.warns(RuntimeWarning):
        keys = [k for b in loader for k in b["__key__"]]
    assert len(keys) == 28 and "003.png" not in keys and "011.png" not in keys
    assert loader.stats()["skipped"] == 2
    with pytest.raises(PrepError, match="max_skip_fraction"):
        _ = [b for b in DataLoader(LocalDataset(imgs, caps, batch_size=4, image_size=16, world_size=1, rank=0,
                                                max_skip_fraction=0.05))]


# ---------------------------------------------------------------------------------------- I/O errors
_WRITE_ONLY = Path("/proc/sys/vm/compact_memory")  # mode 0200: unreadable even by root


def _make_unreadable(path: Path, how: str) -> None:
    """Put a file this process cannot read where `path` was: a directory, or one it may not read (as root,
    which reads any file, a link to a write-only /proc file)."""
    path.unlink()
    if how == "directory":
        path.mkdir()
    elif os.geteuid() == 0:
        if not _WRITE_ONLY.exists():
            pytest.skip("no write-only file to stand for an unreadable one")
        path.symlink_to(_WRITE_ONLY)
    else:
        path.write_bytes(b"x")
        path.chmod(0)


@pytest.mark.parametrize("how", ["directory", "no permission"])
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", ["shard", "image"])
def test_a_file_that_cannot_be_read_raises_one_line_naming_it(tmp_path, kind, how, workers):
    """A shard or image that is there but cannot be read is an I/O error, not a bad sample: it raises,
    under any on_error, as one line naming the file (it was a worker's traceback of a bare OSError)."""
    if kind == "shard":
        names = [f"s{i}.tar" for i in range(3)]
        for i, name in enumerate(names):
            info = write_shard(tmp_path / name, [(f"k{i}{j}", {"jpg": jpeg_bytes(j, 8)}) for j in range(4)],
                               fsync=False)
            write_index(tmp_path / name, info.offsets)
        ds: ShardDataset | LocalDataset = ShardDataset([tmp_path / n for n in names], batch_size=12,
                                                       rank=0, world_size=1)
        target = tmp_path / names[1]
    else:
        imgs, caps = _folder(tmp_path, n=12, bad=())
        ds = LocalDataset(imgs, caps, batch_size=12, image_size=16, rank=0, world_size=1)
        target = imgs / "005.png"
    _make_unreadable(target, how)
    with pytest.raises(PrepError) as err:
        list(DataLoader(ds, num_workers=workers))
    line = str(err.value)
    assert str(target) in line and "\n" not in line and "fix:" in line
    assert not isinstance(err.value, BadSample)
