"""The bulk scan path (`tar_bulk.walk_plain`, used by `scan_tar`) must give exactly what the header-by-header
scanner gives, or decline: checked on random tars as webdataset/img2dataset, tarfile (ustar, GNU, pax) and
prep write them, then with one byte flipped, a header field byte set to an edge value, or the file cut
short, where any difference would be a sample kept or lost that the exact path treats otherwise. The
bulk scan runs in C where it was built and in Python (numpy checks) otherwise: both run on every case
and must agree, member for member and decline for decline."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prep.formats.tar as tar_mod
import prep.formats.tar_write as tar_write
from prep.formats.tar import TarFormatError, TarScan, scan_tar
from prep.formats.tar_bulk import octal_columns, plain_headers, walk_plain

KEYS = st.from_regex(r"[a-z0-9_-]{1,12}(/[a-z0-9]{1,6})?", fullmatch=True).filter(
    lambda k: not k.startswith("__"))
EXTS = ["jpg", "txt", "json", "seg.png", "npy"]


def write_tar(path: Path, samples: list[tuple[str, dict[str, int]]], how: str, rng: random.Random) -> None:
    if how == "webdataset":  # float mtimes: a pax header before every member, as img2dataset's tars
        with wds.TarWriter(str(path)) as tw:
            for key, members in samples:
                tw.write({"__key__": key, **{e: rng.randbytes(n) for e, n in members.items()}})
        return
    fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[how]
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, members in samples:
            for ext, n in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uname = n, 1_700_000_000, "someone"
                tf.addfile(info, io.BytesIO(rng.randbytes(n)))


def exact_scan(path: Path) -> object:
    real = tar_mod._plain_scan
    tar_mod._plain_scan = lambda p: None
    try:
        return outcome(path)
    finally:
        tar_mod._plain_scan = real


def python_walk_scan(path: Path) -> object:
    real = tar_mod._NATIVE_SCAN
    tar_mod._NATIVE_SCAN = None
    try:
        return outcome(path)
    finally:
        tar_mod._NATIVE_SCAN = real


def bulk_scans(path: Path) -> tuple[TarScan | None, TarScan | None]:
    """The bulk scan in Python and in C (None where either declines, or C was not built)."""
    native = tar_mod._plain_scan(str(path)) if tar_mod._NATIVE_SCAN else None
    real = tar_mod._NATIVE_SCAN
    tar_mod._NATIVE_SCAN = None
    try:
        return tar_mod._plain_scan(str(path)), native
    finally:
        tar_mod._NATIVE_SCAN = real


def outcome(path: Path) -> object:
    try:
        s = scan_tar(path, tolerate_damage=True)
    except Exception as err:  # unsafe names and the like: compare the error itself
        return (type(err).__name__, str(err))
    err = None if s.error is None else (s.error.offset, str(s.error))
    return s.samples, s.skipped, s.end, err


@st.composite
def cases(draw: st.DrawFn) -> tuple[int, list[tuple[str, dict[str, int]]], str, str]:
    keys = draw(st.lists(KEYS, min_size=0, max_size=8, unique=True))
    samples = [(k, {e: draw(st.integers(0, 3000) | st.sampled_from([0, 511, 512, 513]))
                    for e in draw(st.lists(st.sampled_from(EXTS), min_size=1, max_size=3, unique=True))})
               for k in keys]
    how = draw(st.sampled_from(["webdataset", "ustar", "gnu", "pax"]))
    damage = draw(st.sampled_from(["whole", "flip", "poke", "cut"]))
    return draw(st.integers(0, 2**32)), samples, how, damage


EDGE_BYTES = b"0178 \0\n_x=9"  # digits at and past octal's end, padding, separators, junk


def poke_header_field(blob: bytearray, rng: random.Random) -> None:
    """Set one byte of a header's size field, or of the pax record after a pax header, to an edge value:
    where the two walks parse by hand, and must decline or accept alike."""
    headers = [o for o in range(0, len(blob) - 511, 512) if blob[o + 257 : o + 262] == b"ustar"]
    if not headers:
        return
    at = rng.choice(headers)
    field = rng.randrange(124, 136) if blob[at + 156] != ord("x") or rng.random() < 0.5 else \
        512 + rng.randrange(0, 40)
    if at + field < len(blob):
        blob[at + field] = rng.choice(EDGE_BYTES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_bulk_scan_equals_exact_scan(tmp_path: Path, case) -> None:
    seed, samples, how, damage = case
    rng = random.Random(seed)
    path = tmp_path / f"{seed}-{how}.tar"
    write_tar(path, samples, how, rng)
    blob = bytearray(path.read_bytes())
    if damage == "flip" and blob:
        blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    elif damage == "poke":
        poke_header_field(blob, rng)
    elif damage == "cut" and blob:
        del blob[rng.randrange(len(blob)):]
    path.write_bytes(bytes(blob))
    want = exact_scan(path)
    assert outcome(path) == want
    assert python_walk_scan(path) == want
    in_python, in_c = bulk_scans(path)
    if tar_mod._NATIVE_SCAN is not None:
        assert in_c == in_python


@pytest.mark.parametrize(("records", "passes"), [
    ({"mtime": "1700000000.5"}, True), ({"uname": "someone"}, True), ({"gid": "7"}, True),
    ({"path": "other.jpg"}, False), ({"size": "3"}, False), ({"comment": "hi"}, False),
    ({"mtime": "1", "uid": "2"}, False),  # two records: the exact path reads them
    ({"uname": "x" * 400}, True), ({"uname": "x" * 600}, False),  # a record past one block
])
def test_both_walks_pass_over_only_one_harmless_pax_record(tmp_path: Path, records: dict[str, str],
                                                           passes: bool) -> None:
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a.jpg", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 3, records
            tf.addfile(info, io.BytesIO(b"abc"))
    walk = walk_plain(str(path))
    assert (walk is not None) == passes
    in_python, in_c = bulk_scans(path)
    assert (in_python is not None) == passes
    if tar_mod._NATIVE_SCAN is not None:
        assert in_c == in_python
    if passes:
        assert walk.sizes == [3, 3] and walk.names == ["a.jpg", "a.txt"]
        assert walk.starts == [0, 2048] and walk.headers == [1024, 3072]
    assert python_walk_scan(path) == exact_scan(path) == outcome(path)


@pytest.mark.parametrize("name", ["a.jpg\nb.jpg", "a/.jpg", "/a.jpg", "a//b.jpg", "a.", ".jpg", "__a.jpg",
                                  "a.j/pg", "a\u00e9.jpg", "a b.jpg", "a.jpg\0x"])
def test_both_walks_decline_names_outside_the_plain_rule(tmp_path: Path, name: str) -> None:
    """Each such name goes the exact way, which reports it or reads it as it is (a newline inside a
    name once split it into two for the bulk scan, which then failed on the member count)."""
    path = tmp_path / "odd.tar"
    blob = bytearray()
    for n in (name, "b.txt"):
        info = tarfile.TarInfo("x")
        info.size = 3
        header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
        raw = n.encode("utf-8")
        header[:100] = raw + bytes(100 - len(raw))
        header[148:156] = b"        "
        header[148:155] = b"%06o\0" % sum(header)
        blob += header + b"abc".ljust(512, b"\0")
    path.write_bytes(bytes(blob + bytes(1024)))
    assert walk_plain(str(path)) is None and bulk_scans(path) == (None, None)
    assert outcome(path) == exact_scan(path) == python_walk_scan(path)


def test_native_helpers_are_built_where_a_compiler_is() -> None:
    """`make install` compiles the C helpers (optional, so installs without a compiler still work); with
    a compiler on the machine, a missing module means the build failed and every scan runs ~3x slower."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the Python versions serve")
    assert tar_mod.NATIVE is not None, "prep.formats._tarnative was not built: re-run make install"


def test_bulk_scan_takes_img2dataset_tars_and_declines_the_unusual(tmp_path: Path) -> None:
    rng = random.Random(0)
    plain = tmp_path / "wds.tar"
    samples = [("000001", {"jpg": 900, "txt": 5}), ("000002", {"jpg": 10, "json": 2})]
    write_tar(plain, samples, "webdataset", rng)
    walk = walk_plain(str(plain))
    assert walk is not None and walk.names == ["000001.jpg", "000001.txt", "000002.jpg", "000002.json"]
    assert walk.sizes == [900, 5, 10, 2] and walk.starts[0] == 0 and walk.headers[0] == 1024  # after its pax
    long = tmp_path / "long.tar"
    write_tar(long, [("k" * 120, {"jpg": 3})], "pax", rng)  # the name is in a pax record
    meta = tmp_path / "meta.tar"
    write_tar(meta, [("__info__", {"json": 3}), ("a", {"jpg": 1})], "ustar", rng)
    for declined in (long, meta):
        assert walk_plain(str(declined)) is None
        assert scan_tar(declined).samples  # the exact path reads it
    with pytest.raises(TarFormatError, match="truncated"):
        cut = tmp_path / "cut.tar"
        cut.write_bytes(plain.read_bytes()[:1700])
        scan_tar(cut)


def test_numpy_headers_are_tarfiles_bytes() -> None:
    names = [b"a.jpg", b"x" * 96 + b".txt", b"dir/sub/0001.seg.png"]
    sizes = np.array([0, 8**11 - 1, 123456], dtype=np.int64)
    got = plain_headers(tar_write._HEADER_TEMPLATE, names, sizes)
    for row, name, size in zip(got, names, sizes.tolist(), strict=True):
        assert row.tobytes() == tar_write.member_header(name.decode(), size)
    assert octal_columns(np.array([8, 0o777]), 4).tobytes() == b"00100777"


def test_gc_is_paused_only_while_grouping_and_never_left_off() -> None:
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), tar_mod.gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("a scan failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with tar_mod.gc_paused():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


@pytest.mark.parametrize("names", [["a.jpg", "b.jpg", "a.txt"], ["a.jpg", "a.jpg"],
                                   ["a.jpg", "a.txt", "b.jpg"]])
def test_grouping_declines_keys_apart_and_extensions_twice(tmp_path: Path, names: list[str]) -> None:
    """A key that comes back after another, or one extension twice in a sample, is left to the exact
    scanner (which says where); otherwise the C grouping gives the same Samples and Members."""
    path = tmp_path / "g.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"data"))
    assert outcome(path) == exact_scan(path) == python_walk_scan(path)
    if names[-1] == "b.jpg":
        scan = scan_tar(path)
        member = scan.samples[0].members["txt"]
        assert type(member) is tar_mod.Member and member.end == member.data_offset + 512
        assert [s.key for s in scan.samples] == ["a", "b"] and scan.samples[0].end == scan.samples[1].offset
