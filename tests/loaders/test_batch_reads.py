"""The batch paths of a worker agree with the plain ones they replace: a batch's local reads in one C
call (and its Python twin) return the file's bytes, and a truncated shard says where it ends; the C
member parser takes what `member_spans` takes and declines the rest; the C frame-header read gives
simplejpeg's size; JSON members parse as `json.loads` does; the slot walk finds what a full walk finds;
workers start with the inherited heap frozen out of the cyclic GC."""

from __future__ import annotations

import gc
import io
import json
import multiprocessing as mp
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from prep.errors import PrepError
from prep.loaders import DataLoader, ShardDataset
from prep.loaders.io import decode, images, members, shm, sources
from prep.loaders.io.members import batch_member_spans, member_spans
from prep.loaders.skips import BadSample
from prep.testing.loader_data import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_reads") / "data"
    make_shards(root, [40, 25, 31], image_size=12)
    return root


@pytest.fixture(params=["native", "python"])
def read_path(request, monkeypatch):
    """Each test runs on the C batch read and on its Python twin (a preadv per sample)."""
    if request.param == "python":
        monkeypatch.setattr(sources, "_NATIVE_READ", None)
    elif sources._NATIVE_READ is None:
        pytest.skip("prep.formats._tarnative was not built here")
    return request.param


def test_a_batch_read_returns_the_file_bytes_of_each_sample(shards, read_path):
    ds = ShardDataset(shards, batch_size=8, seed=3)
    files = {i: Path(s.url).read_bytes() for i, s in enumerate(ds.shards)}
    rng = random.Random(0)
    for _ in range(20):
        refs = [(i, rng.randrange(s.samples)) for i, s in
                (rng.choice(list(enumerate(ds.shards))) for _ in range(rng.randint(1, 40)))]
        buf, spans = ds.reader.read_into(refs, lambda n: np.full(n, 7, dtype=np.uint8))
        assert spans[0][0] == 0 and spans[-1][1] == len(buf)
        for (i, j), (a, b) in zip(refs, spans, strict=True):
            off = ds.reader.offsets(i)
            assert bytes(buf[a:b]) == files[i][int(off[j]) : int(off[j + 1])]


def test_the_steady_state_read_gives_the_general_reads_bytes_and_spans(shards):
    """Once a batch's shards are open and indexed, `read_into` takes one pass and one C read
    (`_read_open`); it returns what the general path returns for the same references."""
    if sources._NATIVE_READ is None:
        pytest.skip("prep.formats._tarnative was not built here")
    ds = ShardDataset(shards, batch_size=8, seed=3)
    reader = ds.reader
    rng = random.Random(1)
    refs = [(i, rng.randrange(ds.shards[i].samples)) for i in (rng.randrange(3) for _ in range(40))]
    assert reader._read_open(refs, lambda n: np.empty(n, np.uint8)) is None  # nothing open yet
    general, general_spans = reader.read_into(refs, lambda n: np.full(n, 1, dtype=np.uint8))
    for _ in range(10):
        refs2 = rng.sample(refs, rng.randint(1, len(refs)))
        got = reader._read_open(refs2, lambda n: np.full(n, 2, dtype=np.uint8))
        assert got is not None
        buf, spans = got
        for (i, j), (a, b) in zip(refs2, spans, strict=True):
            k = refs.index((i, j))
            ga, gb = general_spans[k]
            assert bytes(buf[a:b]) == bytes(general[ga:gb]) and b - a == gb - ga
        assert spans[-1][1] == len(buf)
    os.close(reader._fds.pop(1))  # a shard not open in this process: the general path opens it
    assert reader._read_open([(0, 0), (1, 0)], lambda n: np.empty(n, np.uint8)) is None


def test_a_truncated_shard_is_named_with_the_byte_where_it_ends(shards, tmp_path, read_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in Path(shards).glob("shard-00001.tar*"):
        (folder / f.name).write_bytes(f.read_bytes())
    tar = folder / "shard-00001.tar"
    ds = ShardDataset(tar, batch_size=4, seed=0)
    off = ds.reader.offsets(0)
    cut = int(off[10]) + 700  # inside sample 10
    os.truncate(tar, cut)
    ds.reader.read_into([(0, 3), (0, 9)], lambda n: np.empty(n, np.uint8))  # before the cut: fine
    with pytest.raises(PrepError) as err:
        ds.reader.read_into([(0, 2), (0, 10), (0, 11)], lambda n: np.empty(n, np.uint8))
    assert err.value.what == f"shard ends at byte {cut}, sample 10 needs bytes up to {int(off[11])}"
    assert err.value.where == str(tar) and "truncated" in (err.value.fix or "")


# ------------------------------------------------------------------------------------------- members
def _header(name: bytes, size: int, *, typeflag: bytes = b"0", magic: bytes = b"ustar\x0000",
            prefix: bytes = b"", size_field: bytes | None = None) -> bytes:
    h = bytearray(512)
    h[: len(name)] = name
    h[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    h[156:157] = typeflag
    h[257 : 257 + len(magic)] = magic
    h[345 : 345 + len(prefix)] = prefix
    return bytes(h)


def _member(name: bytes, data: bytes, **kw) -> bytes:
    return _header(name, len(data), **kw) + data + bytes(-len(data) % 512)


NAMES = [b"k1.jpg", b"k1.txt", b"k1.json", b"k1.a.b", b"dir/k1.jpg", b"k2.jpg", b"__meta__", b"k1",
         b"__k1.jpg", b"./k1.jpg", b"../k1.jpg", b"/abs.jpg", b"k\xc3\xa9.jpg", b"k 1.jpg", b"a/__b.jpg"]


@st.composite
def sample_bytes(draw) -> bytes:
    """One sample's bytes as a worker reads them: mostly plain members, sometimes anything a tar (or a
    wrong offset) can put there."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["plain", "plain", "plain", "name", "pax", "gnu", "prefix", "size",
                                     "zeros", "junk", "short"]))
        data = draw(st.binary(max_size=40))
        if kind == "plain":
            out += _member(b"k1." + draw(st.sampled_from([b"jpg", b"txt", b"json", b"cls"])), data)
        elif kind == "name":
            out += _member(draw(st.sampled_from(NAMES)), data)
        elif kind == "pax":
            out += _member(b"PaxHeader/k1.jpg", b"20 comment=abcdefgh\n", typeflag=b"x")
        elif kind == "gnu":
            out += _member(b"k1.jpg", data, magic=b"ustar  \x00")
        elif kind == "prefix":
            out += _member(b"k1.jpg", data, prefix=b"some/dir")
        elif kind == "size":
            field = draw(st.sampled_from([b"00000000012\x00", b"  12 \x00\x00\x00\x00\x00\x00\x00",
                                          b"\x80" + bytes(11), b"0000000001x\x00", bytes(12)]))
            out += _header(b"k1.txt", 0, size_field=field) + data.ljust(512, b"\x00")
        elif kind == "zeros":
            out += bytes(512)
        elif kind == "junk":
            out += draw(st.binary(min_size=512, max_size=600))
        else:
            out += _member(b"k1.txt", b"x" * 600)[: draw(st.integers(0, 1000))]
    return out


def _outcome(got):
    return (type(got).__name__, got.what, got.where) if isinstance(got, PrepError) else got


@settings(max_examples=300, deadline=None)
@given(st.lists(sample_bytes(), min_size=1, max_size=6), st.binary(max_size=7))
def test_the_native_member_parser_takes_what_member_spans_takes(samples, lead):
    if members._NATIVE_MEMBERS is None:
        pytest.skip("prep.formats._tarnative was not built here")
    buf = lead + b"".join(samples)
    spans, at = [], len(lead)
    for s in samples:
        spans.append((at, at + len(s)))
        at += len(s)
    where = [f"sample {k}" for k in range(len(samples))].__getitem__
    mv = memoryview(buf)
    native = batch_member_spans(mv, spans, where)
    original = members._NATIVE_MEMBERS
    try:
        members._NATIVE_MEMBERS = None
        python = batch_member_spans(mv, spans, where)
    finally:
        members._NATIVE_MEMBERS = original
    assert [_outcome(x) for x in native] == [_outcome(x) for x in python]
    for (a, b), got in zip(spans, python, strict=True):  # the Python twin is member_spans itself
        try:
            want = member_spans(mv[a:b], "w")
        except PrepError as err:  # a bad record, or an unsafe name
            assert type(got) is type(err)
            continue
        moved = None if want is None else (want[0], {e: (a + x, a + y) for e, (x, y) in want[1].items()})
        assert got == moved


def test_plain_samples_are_parsed_by_the_c_helper(shards):
    if members._NATIVE_MEMBERS is None:
        pytest.skip("prep.formats._tarnative was not built here")
    ds = ShardDataset(shards, batch_size=8, seed=0)
    buf, spans = ds.reader.read_into([(0, j) for j in range(10)], lambda n: np.empty(n, np.uint8))
    flat = np.array(spans, dtype=np.int64).reshape(-1)
    got = members._NATIVE_MEMBERS(buf, flat)
    assert all(g is not None for g in got)
    assert got == batch_member_spans(buf.data, spans, str)
    assert [g[0] for g in got] == [f"s00000_{j:06d}" for j in range(10)]
    assert sorted(got[0][1]) == ["jpg", "json", "txt"]


def test_unusual_tars_still_parse_through_the_scanner(tmp_path):
    """A tar whose members carry pax headers: the C parser declines it, the loader reads it anyway."""
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(6):
            for ext, data in (("txt", f"caption {i}".encode()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"k{i:03d}.{ext}")
                info.size = len(data)
                info.pax_headers = {"comment": "x" * 10}
                tf.addfile(info, io.BytesIO(data))
    got = [b for b in DataLoader(ShardDataset(path, batch_size=3, shuffle=False))]
    assert [k for b in got for k in b["__key__"]] == [f"k{i:03d}" for i in range(6)]
    assert [c for b in got for c in b["cls"].tolist()] == list(range(6))
    assert got[0]["txt"] == ["caption 0", "caption 1", "caption 2"]


# ---------------------------------------------------------------------------------------------- jpeg
def _jpeg(h: int, w: int, seed: int, **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    mode = kw.pop("mode", "RGB")
    buf = io.BytesIO()
    img.convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(
    [{}, {"progressive": True}, {"optimize": True}, {"subsampling": 0}, {"quality": 5}, {"mode": "L"},
     {"mode": "CMYK"}, {"icc_profile": b"p" * 5000}, {"exif": b"Exif\x00\x00" + b"e" * 300}]),
    st.integers(0, 3), st.data())
def test_the_frame_header_read_gives_simplejpegs_size(h, w, kw, damage, data):
    blob = _jpeg(h, w, h * 1000 + w, **dict(kw))
    if damage == 1:  # cut anywhere
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif damage == 2:  # a byte changed anywhere
        at = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([data.draw(st.integers(0, 255))]) + blob[at + 1 :]
    try:
        want = simplejpeg.decode_jpeg_header(blob)[:2]
    except ValueError:
        want = None
    got = images._NATIVE_JPEG_SIZE(blob) if images._NATIVE_JPEG_SIZE is not None else None
    assert got is None or want is None or got == want  # where both answer, they agree
    if damage == 0:
        assert images.jpeg_size(blob) == want == (h, w)
        if images._NATIVE_JPEG_SIZE is not None:
            assert got == (h, w)
    # and whatever it says (a size where libjpeg would stop later), decoding ends as it does without it
    size = (max(1, h // 2), max(1, w // 3))
    fast = _decoded(blob, size)
    native = images._NATIVE_JPEG_SIZE
    try:
        images._NATIVE_JPEG_SIZE = None
        images._SCALED.clear()
        assert _same(fast, _decoded(blob, size))
    finally:
        images._NATIVE_JPEG_SIZE = native
        images._SCALED.clear()


def _decoded(blob: bytes, size: tuple[int, int]):
    out = np.zeros((*size, 3), np.uint8)
    try:
        return images.decode_image(blob, size, "center", 0, "x", out=out).copy()
    except BadSample as err:
        return err.reason


def _same(a, b) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else bool(np.array_equal(a, b))


def test_an_image_the_header_misreports_is_decoded_afresh(monkeypatch):
    data = _jpeg(256, 256, 1, quality=90)
    want = images.decode_image(data, (128, 128), "center", 0, "x")
    monkeypatch.setattr(images, "_NATIVE_JPEG_SIZE", lambda _: (512, 512))  # a lie: 1/4 scale, 128 x 128
    images._SCALED.clear()
    out = np.zeros((128, 128, 3), np.uint8)
    try:
        got = images.decode_image(data, (128, 128), "center", 0, "x", out=out)
    finally:
        images._SCALED.clear()
    assert np.array_equal(got, want) and np.array_equal(out, want)


# ---------------------------------------------------------------------------------------------- json
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "utf-32-be"]),
       st.sampled_from(["", " ", "\n\t", "\r"]), st.sampled_from(["", " ", "\n", "\r\n\t"]))
def test_json_members_parse_as_json_loads_does(value, encoding, lead, trail):
    raw = (lead + json.dumps(value, ensure_ascii=False) + trail).encode(encoding)
    view = memoryview(b"prefix" + raw)[6:]  # as the loader hands it: a view into the read buffer
    assert decode._json(view) == json.loads(raw)


@pytest.mark.parametrize("raw", [b'{"a": ', b"\x80abc", b"", b"\xff\xfe{", b"[1] x", b"[1]\x0b", b"\x0b[1]",
                                 b"[1]]", b"{}{}", b"  ", b'{"a": 1,}', b"nul"])
def test_bad_json_members_fail_as_json_loads_does(raw):
    """The same error, message and position included (the direct scan must not change what json says)."""
    with pytest.raises(ValueError) as want:
        json.loads(raw)
    with pytest.raises(type(want.value)) as got:
        decode._json(memoryview(raw))
    assert str(got.value) == str(want.value)


def test_a_json_member_that_is_not_utf8_is_a_bad_sample():
    d = decode.Decoder.make("uint8", None, "center", None, 0)
    with pytest.raises(BadSample) as err:
        d.value("json", memoryview(b'{"a": "\xff"}'), "k", 0, "shard sample 3")
    assert err.value.reason == "malformed member" and "not UTF-8" in err.value.what


# ---------------------------------------------------------------------------------------- slot walk
def _full_walk(obj, taken):
    """The walk as it was, depth first and to the end: the reference for the breadth-first one."""
    ranges = [(shm._storage_ptr(s.whole), shm._storage_ptr(s.whole) + shm._HEADER + s.cap, id(s))
              for s in taken]
    found: set[int] = set()

    def walk(x, depth):
        if isinstance(x, shm._SCALARS):
            return True
        if depth > shm._MAX_DEPTH:
            return False
        if isinstance(x, torch.Tensor):
            found.update(i for lo, hi, i in ranges if lo <= shm._storage_ptr(x) < hi)
            return True
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                return False
            found.update(i for lo, hi, i in ranges if lo <= x.__array_interface__["data"][0] < hi)
            return True
        if isinstance(x, dict):
            return all(walk(k, depth + 1) and walk(v, depth + 1) for k, v in x.items())
        if isinstance(x, list | tuple):
            return all(walk(v, depth + 1) for v in x)
        return False

    if not taken or not walk(obj, 0):
        return {id(s) for s in taken}
    return found


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_slot_walk_keeps_what_a_full_walk_keeps(data):
    slots = [shm._Slot(1 << 12) for _ in range(3)]
    taken = data.draw(st.lists(st.sampled_from(slots), unique_by=id, max_size=3))
    leaves = st.sampled_from(
        [lambda: "text", lambda: 7, lambda: b"raw", lambda: None, lambda: torch.zeros(2), lambda: object(),
         lambda: np.zeros(3, dtype=object)]
        + [lambda s=s: s.whole[shm._HEADER : shm._HEADER + 8] for s in slots]
        + [lambda s=s: s.whole.numpy()[shm._HEADER + 16 :] for s in slots]
    ).map(lambda make: make())
    tree = data.draw(st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                                  | st.dictionaries(st.sampled_from("abc"), inner, max_size=3)
                                  | st.lists(inner, max_size=2).map(tuple), max_leaves=10))
    deep = data.draw(st.integers(0, 20))
    for _ in range(deep):
        tree = [tree]
    assert shm._slots_in(tree, taken) == _full_walk(tree, taken)


# ------------------------------------------------------------------------------------------- workers
def _freeze_count(batch):
    return {"frozen": torch.tensor([gc.get_freeze_count()])}


def test_workers_start_with_the_inherited_heap_frozen(shards):
    ds = ShardDataset(shards, batch_size=8, seed=0, collate=_freeze_count)
    got = next(iter(DataLoader(ds, num_workers=1)))
    assert got["frozen"].item() > 1000  # the parent's objects (torch's among them) are out of the GC


_EARLY_COLLECTIONS = mp.Value("i", 0)  # collections a worker ran before its inherited heap was frozen


def _count_early_collections(phase: str, info: dict) -> None:
    if phase == "start" and gc.get_freeze_count() == 0 and mp.parent_process() is not None:
        with _EARLY_COLLECTIONS.get_lock():
            _EARLY_COLLECTIONS.value += 1


def _gc_state(batch):
    return {"enabled": torch.tensor([gc.isenabled()]), "frozen": torch.tensor([gc.get_freeze_count()])}


@pytest.mark.parametrize("enabled", [True, False])
def test_workers_fork_with_the_gc_off_until_their_heap_is_frozen(shards, enabled):
    """A collection due in a new worker before `_worker_start` froze its heap would walk (and copy) the
    whole inherited heap: ~0.13 s per worker when the parent had just grown its heap. With a threshold of
    1 every allocation makes one due, so any window with the GC on shows up. Afterwards the GC is as the
    training process had it, there and in the workers."""
    ds = ShardDataset(shards, batch_size=8, seed=0, collate=_gc_state)
    dl = DataLoader(ds, num_workers=2)
    thresholds = gc.get_threshold()
    _EARLY_COLLECTIONS.value = 0
    gc.callbacks.append(_count_early_collections)
    (gc.enable if enabled else gc.disable)()
    gc.set_threshold(1, 1, 1)
    try:
        got = [next(it) for it in [iter(dl)] for _ in range(2)]
        assert gc.isenabled() is enabled
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(_count_early_collections)
        gc.enable()
    assert _EARLY_COLLECTIONS.value == 0
    assert all(b["frozen"].item() > 1000 for b in got)
    assert all(b["enabled"].item() is enabled for b in got)
