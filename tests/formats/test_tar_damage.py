"""A damaged tar keeps every whole sample before the damage: the samples scan_tar(tolerate_damage=True)
keeps are exactly those that Python's tarfile reads completely (data and padding) before the damage
offset, for damage in headers, data, padding and end blocks, on the bulk paths' fallbacks too."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prep.formats import tar as tar_mod
from prep.formats.names import split_key
from prep.formats.tar import BLOCK, TarFormatError, iter_samples, scan_tar

EXTS = ["jpg", "txt", "json"]
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def write_tar(path: Path, samples: list[tuple[str, dict[str, int]]], fmt: str) -> list[tarfile.TarInfo]:
    """Samples as tarfile writes them (member data: the sample's index repeated); returns the members."""
    with tarfile.open(path, "w", format=FORMATS[fmt]) as t:
        for i, (key, members) in enumerate(samples):
            for ext, size in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = size
                t.addfile(info, io.BytesIO(bytes([i % 251]) * size))
    with tarfile.open(path) as t:
        return t.getmembers()


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def whole_before(damaged: Path, offset: int) -> list[tuple[str, list[str]]]:
    """(key, extensions) of the samples tarfile reads completely before `offset` in the damaged file: the
    members it lists before it stops, grouped by key; a group with any member reaching past the damage
    is not whole."""
    listed: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(damaged) as t:
            for m in t:
                listed.append(m)
    except tarfile.ReadError:
        pass  # damage in the first header, or data cut short: what was listed stands
    groups: dict[str, list[tarfile.TarInfo]] = {}
    for m in listed:
        groups.setdefault(split_key(m.name)[0], []).append(m)
    return [(k, sorted(split_key(m.name)[1] for m in ms)) for k, ms in groups.items()
            if all(m.offset_data + _padded(m.size) <= offset for m in ms)]


def kept(path: Path) -> list[tuple[str, list[str]]]:
    scan = scan_tar(path, tolerate_damage=True)
    return [(s.key, sorted(s.members)) for s in scan.samples]


def both_scanners(path: Path) -> list[list[tuple[str, list[str]]]]:
    """What scan_tar keeps, with the C scan where it was built and with the Python bulk walk."""
    out = [kept(path)]
    real = tar_mod._NATIVE_SCAN
    tar_mod._NATIVE_SCAN = None
    try:
        out.append(kept(path))
    finally:
        tar_mod._NATIVE_SCAN = real
    return out


@st.composite
def damaged_tars(draw: st.DrawFn) -> tuple[list[tuple[str, dict[str, int]]], str, str, int, int]:
    n = draw(st.integers(1, 6))
    long_key = draw(st.booleans())  # a key too long for ustar: pax / GNU long-name headers
    keys = [("k" * 101 if long_key and i == n // 2 else "k") + f"{i:03d}" for i in range(n)]
    samples = [(k, {e: draw(st.integers(0, 1300) | st.sampled_from([0, 511, 512, 513]))
                    for e in draw(st.lists(st.sampled_from(EXTS), min_size=1, max_size=3, unique=True))})
               for k in keys]
    fmt = draw(st.sampled_from(["gnu", "pax"] if long_key else list(FORMATS)))
    how = draw(st.sampled_from(["cut", "garbage"]))
    return samples, fmt, how, draw(st.integers(0, 2**32)), draw(st.integers(0, 2**32))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=damaged_tars())
def test_kept_samples_are_those_tarfile_reads_whole_before_the_damage(tmp_path: Path, case) -> None:
    samples, fmt, how, pick, seed = case
    path = tmp_path / "t.tar"
    members = write_tar(path, samples, fmt)
    blob = bytearray(path.read_bytes())
    if how == "cut":  # anywhere: a header, data, padding, the end blocks
        offset = pick % len(blob)
        del blob[offset:]
    else:  # random bytes over one header: a member's, its pax or long-name header, or an end block
        ends = max(m.offset_data + _padded(m.size) for m in members)
        firsts_and_own = {h for m in members for h in (m.offset, m.offset_data - BLOCK)}
        headers = sorted(firsts_and_own | {ends, ends + BLOCK})
        offset = headers[pick % len(headers)]
        blob[offset : offset + BLOCK] = random.Random(seed).randbytes(BLOCK)
    path.write_bytes(bytes(blob))
    want = whole_before(path, offset)
    assert both_scanners(path) == [want, want]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncation_at_every_block_boundary(tmp_path: Path, fmt: str) -> None:
    samples = [(f"s{i}", {"jpg": 700 + 300 * i, "txt": 20 * i}) for i in range(5)]
    src = tmp_path / "whole.tar"
    write_tar(src, samples, fmt)
    blob = src.read_bytes()
    cut = tmp_path / "cut.tar"
    seen = set()
    for offset in range(0, len(blob) + 1, BLOCK):
        cut.write_bytes(blob[:offset])
        got = both_scanners(cut)
        want = whole_before(cut, offset)
        assert got == [want, want], offset
        seen.add(len(want))
    assert seen == set(range(6))  # every count from none to all was met


def test_garbage_over_the_next_samples_first_header_keeps_the_sample_before(tmp_path: Path) -> None:
    """The case as reported: 8 samples, 512 garbage bytes over the 4th sample's first header."""
    src = tmp_path / "t.tar"
    members = write_tar(src, [(f"s{i}", {"jpg": 1000, "txt": 10}) for i in range(8)], "ustar")
    blob = bytearray(src.read_bytes())
    fourth = members[6].offset
    blob[fourth : fourth + BLOCK] = b"\xab" * BLOCK
    src.write_bytes(bytes(blob))
    scan = scan_tar(src, tolerate_damage=True)
    assert [s.key for s in scan.samples] == ["s0", "s1", "s2"]
    assert scan.end == fourth and scan.error is not None and scan.error.offset == fourth
    with pytest.raises(TarFormatError):
        scan_tar(src)


def test_a_stream_cut_inside_the_samples_own_member_keeps_it_out(tmp_path: Path) -> None:
    """Reading data (streams, loaders): a member cut short belongs to the sample being read, which is then
    not whole; a cut member of the next sample leaves the one before whole."""
    src = tmp_path / "t.tar"
    members = write_tar(src, [(f"s{i}", {"jpg": 1000, "txt": 10}) for i in range(3)], "ustar")
    blob = src.read_bytes()
    for cut_at, keys in ((members[3].offset_data + 5, ["s0"]), (members[4].offset_data + 5, ["s0", "s1"])):
        got: list[str] = []
        with pytest.raises(TarFormatError):
            for s in iter_samples(io.BytesIO(blob[:cut_at]), "t.tar", read_data=True, seekable=False):
                got.append(s.key)
        assert got == keys


def test_an_empty_file_is_damage_that_names_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(TarFormatError, match=r"empty\.tar: the file is empty"):
        scan_tar(empty)
    scan = scan_tar(empty, tolerate_damage=True)
    assert scan.samples == [] and scan.error is not None
    no_members = tmp_path / "none.tar"
    tarfile.open(no_members, "w").close()
    assert scan_tar(no_members).samples == [] and scan_tar(no_members).error is None
