"""One member-name rule: whatever the writer accepts, the scanner (C and Python) and the loader read back
as the same samples; a base-256 size no file can hold is damage, not a crash."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prep.formats.names import IMAGE_EXTS, UnsafeMemberError, canonical_ext, member_name, member_parts
from prep.formats.tar import TarFormatError, iter_samples, scan_tar
from prep.formats.tar_write import write_shard
from prep.loaders import DataLoader, ShardDataset

_ALPHABET = st.sampled_from([*"ab_-./é x", "__", "./", ".."])
_KEYS = st.lists(_ALPHABET, min_size=1, max_size=8).map("".join)
_EXTS = st.lists(st.sampled_from([*"jpgtx_.-/", "__"]), min_size=1, max_size=5).map("".join)


ACCEPTED: list[str] = []


def _loader_samples(path: Path) -> list[tuple[str, list[str]]]:
    ds = ShardDataset(str(path), batch_size=1, shuffle=False, decode="raw", world_size=1, rank=0)
    return [(b["__key__"][0], sorted(k for k in b if k != "__key__")) for b in DataLoader(ds)]


def _read_everywhere(path: Path) -> list[list[tuple[str, list[str]]]]:
    """The samples as the bulk scan (C where built), the exact Python scanner and the loader see them."""
    with open(path, "rb") as f:
        exact = [(s.key, sorted(s.members)) for s in iter_samples(f, str(path))]
    bulk = [(s.key, sorted(s.members)) for s in scan_tar(path).samples]
    return [bulk, exact, _loader_samples(path)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_KEYS, exts=st.lists(_EXTS, min_size=1, max_size=3, unique=True))
@example(key="d.ir/__é x", exts=["jpg", "t.x"])  # the unusual classes, every run: `__`, a dotted folder,
@example(key="a__b", exts=["jpg"])  # non-ASCII, a space (random draws alone may miss them)
def test_what_the_writer_accepts_every_reader_reads_identically(key, exts):
    try:
        for ext in exts:
            member_name(key, ext, "test")
    except UnsafeMemberError:
        return  # refused by the writer: nothing to read
    ACCEPTED.append(key)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.tar"
        member = {ext: ext.encode() for ext in exts}
        samples = [("a0", {"txt": b"first"}), (key, member), ("zz9", {"txt": b"x"})]
        write_shard(path, samples, fsync=False)
        want = sorted((k, sorted(m)) for k, m in samples)
        for got in _read_everywhere(path):
            assert sorted(got) == want


@pytest.mark.parametrize("key", ["dir/__x", "__x", "a/b/__c_", "_x"])
def test_double_underscore_keys_that_are_not_metadata_are_samples(tmp_path, key):
    path = tmp_path / "s.tar"
    write_shard(path, [(key, {"jpg": b"j", "txt": b"t"})], fsync=False)
    for got in _read_everywhere(path):
        assert got == [(key, ["jpg", "txt"])]


def test_metadata_members_are_passed_over_by_every_reader(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("__info__", b"{}"), ("__meta__/x.txt", b"m"), ("k.txt", b"t"), ("k.jpg", b"j")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert member_parts("__meta__/x.txt") is None and member_parts("dir/__x.jpg") == ("dir/__x", "jpg")
    for got in _read_everywhere(path):
        assert got == [("k", ["jpg", "txt"])]


def _with_size_field(header: bytes, field: bytes) -> bytes:
    h = bytearray(header[:124] + field + header[136:])
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def test_base256_size_beyond_any_file_is_damage_with_offset(tmp_path):
    path = tmp_path / "big.tar"
    write_shard(path, [("a", {"txt": b"hello"})], fsync=False)
    good = path.read_bytes()
    second = 1024  # after the first member's header and data block
    bad_header = tarfile.TarInfo("b.txt").tobuf(format=tarfile.USTAR_FORMAT)
    bad_header = _with_size_field(bad_header, b"\x80" + b"\xff" * 11)
    path.write_bytes(good[:second] + bad_header + bytes(1024))
    scan = scan_tar(path, tolerate_damage=True)
    assert all(s.end <= second for s in scan.samples)  # only whole samples before the damage
    assert scan.error is not None and scan.error.offset == second and str(path) in str(scan.error)
    with pytest.raises(TarFormatError, match="larger than any file"):
        scan_tar(path)


def test_the_property_saw_unusual_names():
    """Run after the property: it wrote keys with `__`, dots in folders and non-ASCII letters."""
    assert any("__" in k for k in ACCEPTED) and any("é" in k for k in ACCEPTED), ACCEPTED


@settings(max_examples=300, deadline=None)
@given(name=st.lists(st.sampled_from([*"ab_-./é:\\x0", "\x00", "__", "./", ".."]), min_size=1, max_size=12)
       .map("".join))
def test_the_loaders_fast_name_split_is_the_rule(name):
    from prep.formats.names import check_member_name, read_member_name

    try:
        want = member_parts(check_member_name(name, "t"))
    except UnsafeMemberError:
        with pytest.raises(UnsafeMemberError):
            read_member_name(name, "t")
        return
    assert read_member_name(name, "t") == want


@given(ext=st.sampled_from(IMAGE_EXTS), flips=st.lists(st.booleans(), min_size=4, max_size=4))
def test_an_image_extension_in_any_case_is_canonical_in_lower_case(ext: str, flips: list[bool]) -> None:
    cased = "".join(c.upper() if f else c for c, f in zip(ext, flips, strict=False))  # flips >= len(ext)
    assert canonical_ext(cased) == ext and canonical_ext(canonical_ext(cased)) == ext


@given(ext=st.text(alphabet="aBjJnNpPsStTxX.0_", min_size=1, max_size=8))
def test_other_extensions_keep_their_case(ext: str) -> None:
    assert canonical_ext(ext) == (ext.lower() if ext.lower() in IMAGE_EXTS else ext)
