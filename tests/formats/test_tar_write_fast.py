"""The block writer behind write_shard: runs of back-to-back source members read in one call, headers
and padding put over what the source held between them, members larger than a block streamed;
and its bulk path for shards made only of file slices (scattered reads,
numpy headers). Proven against Python's own tarfile on random layouts: byte for byte, with
the same checksum and offsets, at tiny block sizes so every boundary case is reached. Also the scanner's
C-level header byte sum."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prep.formats.tar_write as tar_mod
from prep.formats.names import UnsafeMemberError, member_name
from prep.formats.tar import TarFormatError, _byte_sum, scan_tar
from prep.formats.tar_write import FileSlice, write_shard

EXTS = ["jpg", "json", "txt", "seg.png", "npy"]


def tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[int]]:
    """The reference: tarfile (PAX, fixed metadata) writing members sorted by key then extension."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for key, members in sorted(samples):
            offsets.append(buf.tell())
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(members[ext]), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(members[ext]))
        offsets.append(buf.tell())
    return buf.getvalue(), offsets


def lay_out(rng: random.Random, sizes: list[int], garbage: bool) -> tuple[bytes, list[int]]:
    """A source file holding each member's data; consecutive members mostly one tar header apart (so
    they join a run), sometimes further (pax headers, skipped members). Non-data bytes are random when
    `garbage`, so headers and padding the writer fails to put in place show up."""
    blob = bytearray()
    offsets = []
    for size in sizes:
        r = rng.random()  # beyond BULK_GAP (4 KB) the bulk path starts a new read
        gap = 512 if r < 0.6 else 512 * rng.randint(2, 4) if r < 0.9 else 512 * rng.randint(9, 20)
        blob += (rng.randbytes(gap) if garbage else bytes(gap))
        offsets.append(len(blob))
        blob += rng.randbytes(size)
        pad = -size % 512
        blob += rng.randbytes(pad) if garbage else bytes(pad)
    return bytes(blob), offsets


@st.composite
def shard_inputs(draw: st.DrawFn) -> tuple[int, list[tuple[str, dict[str, str]]], list[int], int, bool]:
    n = draw(st.integers(0, 12))
    keys = draw(st.lists(st.from_regex(r"[a-z0-9_/-]{1,8}", fullmatch=True).filter(
        lambda k: not k.startswith(("/", "__")) and "//" not in k and not k.endswith("/")),
        min_size=n, max_size=n, unique=True))
    long_key = draw(st.booleans())  # a name over 100 bytes takes a pax header (not 512 bytes long)
    if long_key and keys:
        keys[0] = "d" * 120 + keys[0]
    kinds = ["slice"] if draw(st.booleans()) else ["bytes", "view", "slice"]  # all slices: the bulk path
    samples = [(k, {e: draw(st.sampled_from(kinds))
                    for e in draw(st.lists(st.sampled_from(EXTS), min_size=1, max_size=3, unique=True))})
               for k in keys]
    sizes = draw(st.lists(st.integers(0, 5000) | st.sampled_from([0, 511, 512, 513, 3000, 9000]),
                          min_size=sum(len(m) for _, m in samples), max_size=sum(len(m) for _, m in samples)))
    block = draw(st.sampled_from([1024, 2048, 4096, 1 << 20]))
    return draw(st.integers(0, 2**32)), samples, sizes, block, draw(st.booleans())


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard_inputs())
def test_block_writer_matches_tarfile_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    case: tuple) -> None:
    seed, samples, sizes, block, garbage = case
    monkeypatch.setattr(tar_mod, "WRITE_BLOCK", block)
    rng = random.Random(seed)
    if rng.random() < 0.5:  # the Python layout and reads, as where the C helpers were not built
        monkeypatch.setattr(tar_mod, "_NATIVE_FILL", None)
        monkeypatch.setattr(tar_mod, "_NATIVE_LAYOUT", None)
    # members in write order (sorted), so source layout and output order agree and runs form
    order = [(k, e) for k, m in sorted(samples) for e in sorted(m)]
    blob, offsets = lay_out(rng, sizes, garbage)
    src = tmp_path / f"src-{seed}.bin"
    src.write_bytes(blob)
    data = {ke: blob[o:o + s] for ke, o, s in zip(order, offsets, sizes, strict=True)}
    given_members: list[tuple[str, dict[str, object]]] = []
    for key, kinds in samples:
        members: dict[str, object] = {}
        for ext, kind in kinds.items():
            i = order.index((key, ext))
            members[ext] = {"bytes": data[key, ext], "view": memoryview(bytearray(data[key, ext])),
                            "slice": FileSlice(str(src), offsets[i], sizes[i])}[kind]
        given_members.append((key, members))
    rng.shuffle(given_members)  # the writer sorts

    info = write_shard(tmp_path / f"out-{seed}.tar", given_members, fsync=rng.random() < 0.5)
    want, want_offsets = tarfile_bytes([(k, {e: data[k, e] for e in m}) for k, m in samples])
    got = (tmp_path / f"out-{seed}.tar").read_bytes()
    assert got == want
    assert info.checksum == "xxh3_128:" + xxhash.xxh3_128(want).hexdigest() and info.bytes == len(want)
    assert info.offsets == want_offsets and info.keys == sorted(k for k, _ in samples)


def test_contiguous_members_are_read_in_one_call_per_block(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the runs: a tar's back-to-back samples cost one read per block, not one per member."""
    src = tmp_path / "src.tar"
    members = {f"{i:04d}": {"jpg": bytes([i % 251]) * (700 + i), "txt": b"caption %d" % i}
               for i in range(200)}
    with tarfile.open(src, "w") as tf:
        for key, m in members.items():
            for ext in sorted(m):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uname = len(m[ext]), 1_700_000_000, "someone"
                tf.addfile(info, io.BytesIO(m[ext]))
    scan = scan_tar(src)
    samples = [(s.key, {e: FileSlice(str(src), mm.data_offset, mm.size) for e, mm in s.members.items()})
               for s in scan.samples]
    reads = []
    real = tar_mod.os.preadv
    monkeypatch.setattr(tar_mod.os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off))
    info = write_shard(tmp_path / "out.tar", samples)
    assert len(reads) <= info.bytes // tar_mod.WRITE_BLOCK + 1
    want, _ = tarfile_bytes(list(members.items()))
    assert (tmp_path / "out.tar").read_bytes() == want  # source owner names and mtimes are gone


@pytest.mark.parametrize("reads", ["native", "python"])
def test_short_source_fails_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               reads: str) -> None:
    if reads == "python":
        monkeypatch.setattr(tar_mod, "_NATIVE_FILL", None)
    elif tar_mod._NATIVE_FILL is None:
        pytest.skip("the C helpers were not built")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    with pytest.raises(TarFormatError, match="400 bytes early") as err:
        write_shard(tmp_path / "out.tar", [("a", {"jpg": FileSlice(str(src), 0, 500)}),
                                           ("b", {"jpg": FileSlice(str(src), 600, 800)})])
    assert err.value.where == str(src) and err.value.offset == 1000
    assert list(tmp_path.iterdir()) == [src]


def test_hashing_failure_surfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while hashing is raised in the caller, and the temp file is removed."""
    class Broken:
        def update(self, data: object) -> None:
            raise MemoryError("hash failed")

        def hexdigest(self) -> str:
            return ""

    monkeypatch.setattr(tar_mod, "new_hasher", Broken)
    with pytest.raises(MemoryError, match="hash failed"):
        write_shard(tmp_path / "out.tar", [("a", {"jpg": b"x" * 10})])
    assert list(tmp_path.iterdir()) == []


def test_unsimple_names_still_checked(tmp_path: Path) -> None:
    """Keys outside the fast name path still go through member_name's checks."""
    with pytest.raises(UnsafeMemberError):
        write_shard(tmp_path / "out.tar", [("a.b", {"jpg": b"x"})])
    with pytest.raises(UnsafeMemberError):
        write_shard(tmp_path / "out.tar", [("ok", {"b__": b"x"}), ("__a", {"b__": b"x"})])  # `__a.b__`
    assert member_name("a/b-c_1", "seg.png", "w") == "a/b-c_1.seg.png"


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=6))
def test_fast_name_rule_never_accepts_what_member_name_refuses(key: str, ext: str) -> None:
    """The writer skips member_name for keys and extensions matching its simple patterns: only safe if
    member_name accepts every such pair unchanged."""
    if tar_mod._SIMPLE_KEY.fullmatch(key) and tar_mod._SIMPLE_EXT.fullmatch(ext):
        assert member_name(key, ext, "w") == f"{key}.{ext}"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_header_byte_sum_in_c_is_the_byte_sum(block: bytes) -> None:
    """The scanner's checksum sum (two Adler-32 halves) equals Python's sum, at the extremes too."""
    assert _byte_sum(block) == sum(block)
    assert _byte_sum(b"\xff" * 512) == 255 * 512 and _byte_sum(bytes(512)) == 0


def test_blocks_reach_the_file_in_writes_of_at_most_write_piece(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB block goes out as several `write`s no larger than WRITE_PIECE (large writes make the kernel
    fill large page cache folios, which cost several times the copy on VMs with free page reporting)."""
    sizes: list[int] = []

    class Recording(io.FileIO):
        def write(self, b):  # type: ignore[override]
            sizes.append(len(memoryview(b)))
            return super().write(b)

    monkeypatch.setattr(tar_mod, "open", lambda p, mode, buffering: Recording(p, mode), raising=False)
    data = random.Random(0).randbytes(3 << 20)
    info = write_shard(tmp_path / "out.tar", [(f"{i:03d}", {"bin": data[i << 16: (i + 1) << 16]})
                                              for i in range(48)])
    assert max(sizes) <= tar_mod.WRITE_PIECE < tar_mod.WRITE_BLOCK
    assert sum(sizes) == info.bytes == (tmp_path / "out.tar").stat().st_size
    assert len(sizes) >= info.bytes // tar_mod.WRITE_PIECE


@pytest.mark.parametrize("reads", ["native", "python"])
def test_reused_blocks_hold_nothing_of_earlier_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       reads: str) -> None:
    """Small blocks refilled many times: every header gap and padding byte is written anew (random
    member sizes leave earlier bytes where a later block pads), byte for byte as tarfile writes."""
    if reads == "python":
        monkeypatch.setattr(tar_mod, "_NATIVE_FILL", None)
    elif tar_mod._NATIVE_FILL is None:
        pytest.skip("the C helpers were not built")
    monkeypatch.setattr(tar_mod, "WRITE_BLOCK", 4096)
    rng = random.Random(5)
    members = {f"{i:03d}": {"jpg": rng.randbytes(rng.randrange(1, 3000)),
                            "txt": rng.randbytes(rng.randrange(40))} for i in range(60)}
    src = tmp_path / "src.tar"
    with wds.TarWriter(str(src)) as tw:  # pax headers between members, as img2dataset writes them
        for key, m in members.items():
            tw.write({"__key__": key, **m})
    slices = [(s.key, {e: FileSlice(str(src), mm.data_offset, mm.size) for e, mm in s.members.items()})
              for s in scan_tar(src).samples]
    info = write_shard(tmp_path / "out.tar", slices)
    want, want_offsets = tarfile_bytes(list(members.items()))
    assert (tmp_path / "out.tar").read_bytes() == want and info.offsets == want_offsets


ODD_NAMES = ["__m", "f.g", "h\nk", "é", "", "/", "q" * 99, "r\0s", "t//v", "w/", "/z"]
KEYS = st.from_regex(r"[a-z0-9_-]{1,8}(/[a-z0-9]{1,4})?", fullmatch=True) | st.sampled_from(ODD_NAMES)
MEMBER_EXTS = st.sampled_from(["jpg", "txt", "json", "seg.png"]) | st.sampled_from(ODD_NAMES)
SLICES = st.tuples(st.sampled_from(["/src/a.tar", "/src/b.tar"]), st.integers(0, 2**40),
                   st.integers(0, 9000) | st.integers(8**11 - 2, 8**11 + 1),
                   st.booleans() | st.just(True) | st.just(True))  # mostly file slices


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(KEYS, st.dictionaries(MEMBER_EXTS, SLICES, min_size=1, max_size=3)),
                max_size=6, unique_by=lambda kv: kv[0]))
def test_native_layout_equals_python_layout(raw: list) -> None:
    """The C layout gives the Python one's headers and columns, or declines where it declines: keys
    with dots, newlines, NULs, non-ASCII, `__` or empty parts, long names, sizes past 11 octal digits,
    members held in memory."""
    if tar_mod._NATIVE_LAYOUT is None:
        pytest.skip("the C helpers were not built")
    items = [(key, {ext: FileSlice(path, off, size) if as_slice else b"in memory"
                    for ext, (path, off, size, as_slice) in members.items()}) for key, members in raw]
    want = tar_mod._bulk_columns(items)
    got = tar_mod._NATIVE_LAYOUT(items, FileSlice, tar_mod._HEADER_TEMPLATE)
    assert (got is None) == (want is None)
    if want is not None:
        headers, paths, *columns = want
        assert got[0] == headers.tobytes() and got[1] == paths
        assert [bytes(c) for c in got[2:]] == [c.astype(np.int64).tobytes() for c in columns]
