"""The deterministic shard writer: same samples -> same bytes, fixed metadata, names checked, atomic,
and whatever it writes scans back (property-tested with random keys, extensions and sizes)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prep.errors import PrepError
from prep.formats.names import UnsafeMemberError
from prep.formats.tar import scan_tar
from prep.formats.tar_write import FileSlice, write_shard

SAMPLES = [
    (f"{i:06d}", {"jpg": bytes([i]) * (100 * i + 1), "txt": f"caption {i}".encode(), "json": b"{}"})
    for i in range(5)
]


def test_same_samples_same_bytes_in_any_order(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a.tar", SAMPLES)
    b = write_shard(tmp_path / "b.tar", list(reversed(SAMPLES)))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    want = "xxh3_128:" + xxhash.xxh3_128((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert a.checksum == b.checksum == want
    assert a.bytes == os.path.getsize(tmp_path / "a.tar")
    assert a.bytes % (20 * 512) == 0  # padded to whole records, like tar and tarfile


def test_members_sorted_with_fixed_metadata(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", list(reversed(SAMPLES)))
    with tarfile.open(tmp_path / "s.tar") as t:
        members = t.getmembers()
        assert [m.name for m in members] == [f"{k}.{e}" for k, _ in SAMPLES for e in ("jpg", "json", "txt")]
        assert {(m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname, m.type) for m in members} == {
            (0o644, 0, 0, 0, "", "", tarfile.REGTYPE)
        }
        assert t.extractfile("000003.jpg").read() == bytes([3]) * 301


def test_offsets_are_the_idx_and_match_a_scan(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "s.tar", SAMPLES)
    scan = scan_tar(tmp_path / "s.tar")
    assert info.keys == [s.key for s in scan.samples]
    assert info.offsets == [s.offset for s in scan.samples] + [scan.end]


def test_file_slices_are_copied_from_another_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "src.tar", SAMPLES)
    scan = scan_tar(tmp_path / "src.tar")
    src = str(tmp_path / "src.tar")
    slices = [
        (s.key, {e: FileSlice(src, m.data_offset, m.size) for e, m in s.members.items()})
        for s in scan.samples
    ]
    write_shard(tmp_path / "copy.tar", slices)
    assert (tmp_path / "copy.tar").read_bytes() == (tmp_path / "src.tar").read_bytes()
    with pytest.raises(PrepError, match=r"ended .* early"):
        write_shard(tmp_path / "bad.tar", [("k", {"jpg": FileSlice(str(tmp_path / "src.tar"), 0, 10**8)})])
    assert not (tmp_path / "bad.tar").exists()


def test_long_and_unicode_names_use_pax_and_read_back(tmp_path: Path) -> None:
    key = "part-0001/" + "k" * 120 + "/ключ"
    write_shard(tmp_path / "l.tar", [(key, {"txt": b"hi"})])
    with tarfile.open(tmp_path / "l.tar") as t:
        assert t.getnames() == [f"{key}.txt"]
    assert scan_tar(tmp_path / "l.tar").samples[0].key == key


@pytest.mark.parametrize(
    ("key", "ext"),
    [
        ("/abs", "jpg"),
        ("../up", "jpg"),
        ("a/../../b", "txt"),
        ("a.b", "jpg"),
        ("k", "x/y"),
        ("", "jpg"),
        ("k", ""),
        ("./k", "jpg"),
        ("__meta__/k", "json"),
        ("nul\x00", "txt"),
    ],
)
def test_member_names_checked_on_write(tmp_path: Path, key: str, ext: str) -> None:
    with pytest.raises(UnsafeMemberError) as err:
        write_shard(tmp_path / "bad.tar", [("ok", {"jpg": b"1"}), (key, {ext: b"1"})])
    assert str(tmp_path / "bad.tar") in err.value.line()
    assert not any(tmp_path.iterdir()), "a refused shard leaves no file and no temp file behind"


def test_duplicate_keys_refused(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="given twice"):
        write_shard(tmp_path / "d.tar", [("a", {"jpg": b"1"}), ("a", {"txt": b"2"})])
    with pytest.raises(PrepError, match="twice"):
        write_shard(tmp_path / "d.tar", [("a", {"jpg": b"1"}), ("a", {"txt": b"2"})], sort=False)


def test_unsorted_mode_keeps_given_order(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "u.tar", [("b", {"txt": b"2"}), ("a", {"txt": b"1"})], sort=False)
    assert info.keys == ["b", "a"] == [s.key for s in scan_tar(tmp_path / "u.tar").samples]


def test_atomic_replace_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, SAMPLES)
    before = path.read_bytes()

    def broken():
        yield "zz", {"jpg": b"1"}
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard(path, broken(), sort=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]


def test_empty_shard_is_a_valid_tar(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "e.tar", [])
    assert info.offsets == [0] and info.keys == []
    with tarfile.open(tmp_path / "e.tar") as t:
        assert t.getmembers() == []


key_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-é", min_size=1, max_size=40).filter(
    lambda s: not s.startswith("__")
)
keys = st.lists(key_part, min_size=1, max_size=3).map("/".join)
exts = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=12)
sample_sets = st.dictionaries(
    keys, st.dictionaries(exts, st.binary(max_size=1500), min_size=1, max_size=4), min_size=0, max_size=8
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=sample_sets)
def test_property_write_then_scan_round_trips(tmp_path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path = tmp_path / "p.tar"
    info = write_shard(path, samples.items(), fsync=False)
    scan = scan_tar(path)
    assert [s.key for s in scan.samples] == sorted(samples)
    assert info.offsets == [s.offset for s in scan.samples] + [scan.end]
    data = path.read_bytes()
    for s in scan.samples:
        got = {e: data[m.data_offset : m.data_offset + m.size] for e, m in s.members.items()}
        assert got == samples[s.key]
    with tarfile.open(fileobj=io.BytesIO(data)) as t:  # an independent reader agrees
        assert len(t.getmembers()) == sum(len(m) for m in samples.values())
    again = write_shard(tmp_path / "q.tar", list(samples.items())[::-1], fsync=False)
    assert again.checksum == info.checksum


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=160),
    size=st.one_of(st.integers(0, 2**20), st.integers(8**11 - 2, 8**11 + 2)),
)
def test_property_header_equals_tarfiles(name: str, size: int) -> None:
    """The writer's header fast path gives exactly the bytes tarfile gives for the same member."""
    from prep.formats.tar_write import member_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    assert member_header(name, size) == info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8",
                                                   errors="surrogateescape")
