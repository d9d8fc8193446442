"""The header scanner against tars written by Python's tarfile (ustar, GNU long names, pax), damaged
tars (truncated, bad checksum) and crafted traversal tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prep.formats.tar import (
    TarFormatError,
    UnsafeMemberError,
    iter_samples,
    scan_tar,
    split_key,
)

LONG_DIR = "d" * 70 + "/" + "e" * 60  # > 100 chars with the file name: needs GNU longname or pax


def add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            add(t, name, data)
    return path


def independent_offsets(path: Path) -> tuple[list[str], list[int]]:
    """Sample keys and .idx offsets computed with tarfile alone (offset = a member's first header)."""
    keys: list[str] = []
    offsets: list[int] = []
    with tarfile.open(path) as t:
        members = t.getmembers()
        end = t.offset
    for m in members:
        if not m.isreg() or "." not in m.name.rsplit("/", 1)[-1]:
            continue
        key = split_key(m.name)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
            offsets.append(m.offset)
    return keys, [*offsets, end]


def scan_offsets(path: Path) -> list[int]:
    scan = scan_tar(path)
    return [s.offset for s in scan.samples] + [scan.end]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_offsets_match_tarfile_for_every_format(tmp_path: Path, fmt: int) -> None:
    long_ok = fmt != tarfile.USTAR_FORMAT or len(LONG_DIR) < 155
    members = []
    for i in range(5):
        key = f"{LONG_DIR}/sample_{i:03d}" if long_ok else f"s/sample_{i:03d}"
        members += [(f"{key}.jpg", bytes([i]) * (700 + i)), (f"{key}.txt", f"caption {i}".encode())]
    path = make_tar(tmp_path / "a.tar", members, fmt)
    keys, offsets = independent_offsets(path)
    scan = scan_tar(path)
    assert [s.key for s in scan.samples] == keys
    assert scan_offsets(path) == offsets
    assert all(set(s.members) == {"jpg", "txt"} for s in scan.samples)
    with open(path, "rb") as f:  # data offsets and sizes point at the right bytes
        s = scan.samples[3]
        f.seek(s.members["jpg"].data_offset)
        assert f.read(s.members["jpg"].size) == bytes([3]) * 703


def test_gnu_longname_and_pax_headers_are_read(tmp_path: Path) -> None:
    long_name = "x" * 150 + "/k.jpg"
    unicode_name = "ünïcode/ключ.txt"  # pax header with a utf-8 path
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = make_tar(tmp_path / f"{fmt}.tar", [(long_name, b"1"), (unicode_name, b"2")], fmt)
        scan = scan_tar(path)
        assert [(s.key, list(s.members)) for s in scan.samples] == [
            ("x" * 150 + "/k", ["jpg"]),
            ("ünïcode/ключ", ["txt"]),
        ]
        # the sample starts at the extended header, as tarfile's TarInfo.offset says
        assert scan_offsets(path) == independent_offsets(path)[1]


def test_pax_size_record_overrides_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        add(t, "a.bin", b"z" * 1000, pax_headers={"comment": "hi"})
    path = tmp_path / "p.tar"
    path.write_bytes(buf.getvalue())
    scan = scan_tar(path)
    assert scan.samples[0].members["bin"].size == 1000


def test_skips_metadata_dirs_and_extensionless_members(tmp_path: Path) -> None:
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        add(t, "__info__", b"meta")
        add(t, "__meta__/stats.json", b"{}")
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        add(t, "a.jpg")
        add(t, "a.txt")
        add(t, "README", b"no extension")
        add(t, "b.jpg")
        add(t, "__later__/x.json", b"{}")  # trailing skipped member: the end offset still covers it
    scan = scan_tar(path)
    assert [s.key for s in scan.samples] == ["a", "b"]
    assert [n for n, _ in scan.skipped] == ["__info__", "__meta__/stats.json", "README", "__later__/x.json"]
    with tarfile.open(path) as t:
        t.getmembers()
        assert scan.end == t.offset


def test_a_tar_of_a_folder_made_with_dot_reads_as_its_samples(tmp_path: Path) -> None:
    """`tar -cf x.tar -C DIR .` (and tarfile's add(DIR, arcname=".")) archive the folder itself first,
    as `./`: the archive's root, which is safe, not an empty or unsafe name."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.txt", "sub/b.jpg"):
        (folder / name).write_bytes(name.encode())
    path = tmp_path / "folder.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        t.add(folder, arcname=".", recursive=False)
        for name in ("a.jpg", "a.txt", "sub", "sub/b.jpg"):
            t.add(folder / name, arcname=f"./{name}", recursive=False)
    with tarfile.open(path) as t:
        assert t.getnames()[0] in (".", "./")
    scan = scan_tar(path)
    assert [(s.key, sorted(s.members)) for s in scan.samples] == [("a", ["jpg", "txt"]), ("sub/b", ["jpg"])]


def test_samples_group_consecutive_members_only(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")])
    with pytest.raises(TarFormatError, match="appears twice"):
        scan_tar(path)
    path = make_tar(tmp_path / "dup2.tar", [("a.jpg", b"1"), ("a.jpg", b"2")])
    with pytest.raises(TarFormatError, match="two 'jpg' members"):
        scan_tar(path)


def test_read_data_and_non_seekable_stream(tmp_path: Path) -> None:
    members = [(f"k{i}.{e}", f"{i}{e}".encode() * (i + 1)) for i in range(4) for e in ("cls", "txt")]
    path = make_tar(tmp_path / "s.tar", members)

    class Stream(io.RawIOBase):  # a pipe-like stream: no seek
        def __init__(self, data: bytes) -> None:
            self.b = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:
            chunk = self.b.read(len(buf))
            buf[: len(chunk)] = chunk
            return len(chunk)

    samples = list(iter_samples(Stream(path.read_bytes()), "s.tar", read_data=True, seekable=False))
    assert [s.key for s in samples] == [f"k{i}" for i in range(4)]
    assert samples[2].data == {"cls": b"2cls" * 3, "txt": b"2txt" * 3}
    with open(path, "rb") as f:
        seeked = list(iter_samples(f, str(path)))
    assert [s.offset for s in seeked] == [s.offset for s in samples]


def test_truncated_tar_reports_file_and_byte_offset(tmp_path: Path) -> None:
    members = [(f"s{i}.jpg", bytes(2000)) for i in range(4)]
    good = make_tar(tmp_path / "good.tar", members)
    offsets = scan_offsets(good)
    cut = offsets[2] + 512 + 100  # inside sample 2's data
    bad = tmp_path / "cut.tar"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(TarFormatError) as info:
        scan_tar(bad)
    err = info.value
    assert err.offset == offsets[2]
    assert str(bad) in err.line() and "truncated" in err.what and str(cut) in err.what
    assert "\n" not in err.line()
    damaged = scan_tar(bad, tolerate_damage=True)
    assert [s.key for s in damaged.samples] == ["s0", "s1"]
    assert damaged.end == offsets[2] and damaged.error is not None
    half_header = tmp_path / "half.tar"
    half_header.write_bytes(good.read_bytes()[: offsets[1] + 300])
    expected = f"truncated at byte {offsets[1] + 300} .inside the header at byte {offsets[1]}"
    with pytest.raises(TarFormatError, match=expected):
        scan_tar(half_header)


def test_corrupt_header_checksum(tmp_path: Path) -> None:
    good = make_tar(tmp_path / "good.tar", [("a.jpg", b"1"), ("b.jpg", b"2")])
    offsets = scan_offsets(good)
    data = bytearray(good.read_bytes())
    data[offsets[1] + 5] ^= 0x01  # a byte of b.jpg's name
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match=f"corrupt tar header at byte {offsets[1]}") as info:
        scan_tar(bad)
    assert info.value.offset == offsets[1] and str(bad) in info.value.line()
    data[offsets[1] + 124 : offsets[1] + 136] = b"zzzzzzzzzzz\x00"  # size field not octal
    bad.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match="corrupt tar header"):
        scan_tar(bad)


def test_signed_checksum_accepted(tmp_path: Path) -> None:
    """Some old tars store the checksum computed over signed bytes; a high-bit name must still read."""
    header = bytearray(tarfile.TarInfo("é.jpg").tobuf(format=tarfile.GNU_FORMAT, encoding="latin-1"))
    assert any(b > 127 for b in header[:100])
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    header[148:156] = f"{signed:06o}\x00 ".encode()
    path = tmp_path / "signed.tar"
    path.write_bytes(bytes(header) + bytes(1024))
    assert scan_tar(path).samples[0].members["jpg"].size == 0


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("/etc/passwd.txt", tarfile.REGTYPE, "absolute"),
        ("a/../../evil.txt", tarfile.REGTYPE, "'..'"),
        ("..", tarfile.DIRTYPE, "'..'"),
        ("link.jpg", tarfile.SYMTYPE, "link"),
        ("hard.jpg", tarfile.LNKTYPE, "link"),
        ("fifo.jpg", tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_traversal_and_links_rejected(tmp_path: Path, name: str, kind: bytes, why: str) -> None:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        add(t, "ok.jpg")
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        t.addfile(info)
    with pytest.raises(UnsafeMemberError, match=why) as err:
        scan_tar(path)
    assert str(path) in err.value.line() and err.value.fix


def test_missing_and_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="shard not found"):
        scan_tar(tmp_path / "nope.tar")
    with pytest.raises(Exception, match="cannot read shard"):
        scan_tar(tmp_path)


def test_empty_and_eof_without_end_blocks(tmp_path: Path) -> None:
    empty = make_tar(tmp_path / "empty.tar", [])
    assert scan_tar(empty).samples == [] and scan_tar(empty).end == 0
    good = make_tar(tmp_path / "g.tar", [("a.jpg", b"1"), ("b.jpg", b"2")])
    end = scan_offsets(good)[-1]
    no_eof = tmp_path / "noeof.tar"
    no_eof.write_bytes(good.read_bytes()[:end])  # GNU tar tolerates missing end-of-archive blocks
    assert scan_offsets(no_eof) == scan_offsets(good)


def test_cut_inside_the_last_members_padding_is_truncation(tmp_path: Path) -> None:
    good = make_tar(tmp_path / "g.tar", [("a.jpg", b"1" * 10)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: 512 + 100])  # the data is whole, its 512-byte padding is not
    with pytest.raises(TarFormatError, match="truncated at byte 612"):
        scan_tar(cut)


name_part = st.text(alphabet="abcxyz019_-ü", min_size=1, max_size=60).filter(lambda s: not s.startswith("__"))
tar_samples = st.lists(
    st.tuples(
        st.lists(name_part, min_size=1, max_size=3).map("/".join),
        st.lists(
            st.sampled_from(["jpg", "txt", "json", "vae.npy", "cls"]), min_size=1, max_size=3, unique=True
        ),
        st.integers(0, 1500),
    ),
    max_size=6,
    unique_by=lambda t: t[0],
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=tar_samples, fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_property_scan_equals_tarfile(tmp_path: Path, samples, fmt: int) -> None:
    """Any tar tarfile writes (long, nested, non-ASCII names; any sizes) scans to tarfile's own offsets."""
    members = [(f"{key}.{ext}", bytes(size)) for key, exts, size in samples for ext in exts]
    path = make_tar(tmp_path / "h.tar", members, fmt)
    keys, offsets = independent_offsets(path)
    scan = scan_tar(path)
    assert [s.key for s in scan.samples] == keys
    assert [s.offset for s in scan.samples] + [scan.end] == offsets
    assert [sorted(s.members) for s in scan.samples] == [sorted(exts) for _, exts, _ in samples]


def _header(name: str, size: int, typeflag: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """A ustar header with a correct checksum, with any size field (even a malformed one)."""
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:108] = b"0000644\x00"
    h[124:136] = size_field if size_field is not None else f"{size:011o}\x00".encode()
    h[136:148] = b"00000000000\x00"
    h[156:157] = typeflag
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\x00 ".encode()
    return bytes(h)


def _pax(records: bytes) -> bytes:
    return _header("././@PaxHeader", len(records), b"x") + records.ljust(
        (len(records) + 511) // 512 * 512, b"\0"
    )


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_pax(b"0 path=x\n") + _header("a.jpg", 0), "corrupt pax header record"),  # length 0: would loop
        (_pax(b"99 path=x\n") + _header("a.jpg", 0), "corrupt pax header record"),  # runs past the payload
        (_pax(b"zz path=x\n") + _header("a.jpg", 0), "corrupt pax header record"),
        (_pax(b"11 size=-5\n") + _header("a.jpg", 0), "corrupt pax size"),
        (_header("a.jpg", 0, size_field=b"\xff" * 12), "negative size"),
        (_header("././@LongLink", 2**40, b"L"), "extended header of"),
        (_pax(b"10 path=x\n"), "ends inside a member's extended header"),
    ],
    ids=[
        "pax-length-0",
        "pax-past-end",
        "pax-not-a-number",
        "pax-negative-size",
        "base256-negative",
        "huge-longname",
        "pax-then-eof",
    ],
)
def test_crafted_headers_are_clear_errors(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "crafted.tar"
    path.write_bytes(blob + bytes(1024))
    with pytest.raises(TarFormatError, match=message) as err:
        scan_tar(path)
    assert str(path) in err.value.line()


def test_gnu_base256_size_is_read(tmp_path: Path) -> None:
    size_field = b"\x80" + (700).to_bytes(11, "big")
    path = tmp_path / "b256.tar"
    path.write_bytes(_header("a.bin", 0, size_field=size_field) + bytes(1024) + bytes(1024))
    assert scan_tar(path).samples[0].members["bin"].size == 700
