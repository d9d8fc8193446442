"""WebDataset shards as POSIX tars: a header scanner that seeks over data, and a deterministic writer.

The scanner reads 512-byte headers only (pax and GNU long names included) so counting and indexing a
shard costs one header read per member, not a read of its data. Member names are never trusted as
paths: absolute names, `..` components and links are refused.
"""

from __future__ import annotations

import gc
import importlib
import io
import itertools
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, NamedTuple

import numpy as np

from prep.errors import PrepError
from prep.formats.atomic import start_writeback, temp_name
from prep.formats.checksum import checksum_of, new_hasher
from prep.formats.names import (
    PLAIN_EXT,
    PLAIN_KEY,
    UnsafeMemberError,
    check_member_name,
    is_meta_name,
    member_name,
    split_key,
)
from prep.formats.tar_bulk import PlainWalk, plain_headers, walk_plain

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as GNU tar and Python's tarfile do
MAX_EXTENDED_HEADER = 1 << 20  # pax / GNU long-name payloads are read into memory: refuse absurd ones
FIXED_MTIME = 0  # shards carry no wall-clock time, so the same samples give the same bytes
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old-style regular file, contiguous file
_ZERO_BLOCK = bytes(BLOCK)
_MAX_FIELD = (1 << 63) - 1  # the largest file offset: a base-256 number above it cannot be a size


class TarFormatError(PrepError):
    """A truncated or corrupt tar. `offset` is the byte where reading failed; members before it are sound.
    `member` names the member whose header was read but whose data is cut, when that is the damage."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None, offset: int = 0,
                 member: str | None = None):
        self.offset = offset
        self.member = member
        super().__init__(what, where, fix)

    def __reduce__(self):
        return (type(self), (self.what, self.where, self.fix, self.offset, self.member))


class Member(NamedTuple):
    """One regular-file member: where its first header starts, where its data is, how long it is.
    (A tuple: a shard holds tens of thousands, and a tuple is the cheapest immutable record to make.)"""

    name: str
    header_offset: int
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.data_offset + _padded(self.size)


@dataclass(slots=True)
class Sample:
    """The run of consecutive members that share a key. `offset`/`end` bound all of its bytes."""

    key: str
    members: dict[str, Member]
    offset: int
    end: int
    data: dict[str, bytes] | None = None


@dataclass(slots=True)
class TarScan:
    """A whole shard's samples, plus members skipped (with why) and `end`: the offset where the last
    member ends (the `.idx` end value, as energon computes it). For a damaged scan, where the last whole
    sample ends."""

    path: str
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    end: int = 0
    error: TarFormatError | None = None

    def index_offsets(self) -> list[int]:
        """The shard's `.idx` values: each sample's first header, then `end` (N+1 values)."""
        return [s.offset for s in self.samples] + [self.end]


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes, in C: Adler-32's low half is 1 + the byte sum mod 65521, exact
    for 256 bytes (at most 65280). A Python-level sum costs more than the rest of a header's parsing."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _octal(field_bytes: bytes, what: str, path: str, offset: int) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        if field_bytes[0] != 0x80:  # 0xff marks a negative number: no size or checksum is negative
            raise TarFormatError(f"corrupt tar header: negative {what}", path,
                                 "re-create or re-download this shard", offset)
        value = int.from_bytes(field_bytes[1:], "big")
        if value > _MAX_FIELD:  # no file holds it: damage, not a number to seek to
            raise TarFormatError(f"corrupt tar header: {what} {value} is larger than any file", path,
                                 "re-create or re-download this shard", offset)
        return value
    text = field_bytes.split(b"\x00", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"corrupt tar header: {what} field {text!r} is not octal", path,
                             "re-create or re-download this shard", offset) from None


def _parse_pax(data: bytes, path: str, offset: int) -> dict[str, str]:
    """`LEN key=value` records, each ending in a newline; a malformed one is a TarFormatError, never a
    loop or a crash."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarFormatError(f"corrupt pax header record at byte {offset + pos}", path,
                                 "re-create or re-download this shard", offset)
        k, _, v = data[space + 1 : end - 1].partition(b"=")
        records[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _skip(f: BinaryIO, n: int) -> int:
    """Read past `n` bytes of a stream that cannot seek, 1 MiB at a time; returns how many there were."""
    left = n
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
    return n - left


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def iter_members(
    f: BinaryIO, path: str, *, read_data: bool = False, seekable: bool = True,
    archive_end: list[int] | None = None,
) -> Iterator[tuple[Member, bytes | None]]:
    """Yield regular-file members in archive order, with their data when `read_data`.

    Directories, `pax` global headers and unknown member types are passed over (as tarfile and
    energon do); links, devices and unsafe names raise `UnsafeMemberError`; a short read or a bad
    checksum raises `TarFormatError` with the offset. When the archive ends cleanly, `archive_end`
    (if given) receives the offset where the last member ends: the `.idx` end value energon writes.
    """
    pos = 0
    pending_name: str | None = None
    pending_size: int | None = None
    member_start: int | None = None
    while True:
        header = _read_exact(f, BLOCK)
        if len(header) == 0:
            if member_start is not None:
                raise TarFormatError("tar ends inside a member's extended header", path,
                                     "re-create or re-download this shard", member_start)
            if archive_end is not None:
                archive_end.append(pos)
            return  # no end-of-archive blocks: tolerated, as GNU tar does
        if len(header) < BLOCK:
            raise TarFormatError(
                f"tar is truncated at byte {pos + len(header)} (inside the header at byte {pos})", path,
                "re-create or re-download this shard", pos)
        if header == _ZERO_BLOCK:
            if member_start is not None:
                raise TarFormatError("tar ends inside a member's extended header", path,
                                     "re-create or re-download this shard", member_start)
            if archive_end is not None:
                archive_end.append(pos)
            return
        stored = _octal(header[148:156], "checksum", path, pos)
        unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * 32
        # the signed sum (old tars) only when needed: it costs a Python loop over the header
        if stored != unsigned and stored != unsigned - 256 * sum(
                1 for b in header[:148] + header[156:] if b > 127):
            raise TarFormatError(f"corrupt tar header at byte {pos} (checksum mismatch)", path,
                                 "re-create or re-download this shard", pos)
        if member_start is None:
            member_start = pos
        typeflag = header[156:157]
        size = _octal(header[124:136], "size", path, pos)
        name = header[0:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:263] == b"ustar\x00":  # POSIX ustar has a prefix field; old GNU headers do not
            prefix = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        data_offset = pos + BLOCK
        pos = data_offset + _padded(size)
        if typeflag in (b"x", b"L", b"g", b"K"):
            if size > MAX_EXTENDED_HEADER:
                raise TarFormatError(f"corrupt tar header at byte {data_offset - BLOCK}: an extended "
                                     f"header of {size} bytes", path, "re-create or re-download this shard",
                                     data_offset - BLOCK)
            payload = _read_exact(f, _padded(size))
            if len(payload) < _padded(size):
                raise TarFormatError(f"tar is truncated at byte {data_offset + len(payload)}", path,
                                     "re-create or re-download this shard", member_start)
            payload = payload[:size]
            if typeflag == b"x":
                records = _parse_pax(payload, path, data_offset)
                pending_name = records.get("path", pending_name)
                if "size" in records:
                    if not records["size"].isdigit():
                        raise TarFormatError(f"corrupt pax size {records['size']!r}", path,
                                             "re-create or re-download this shard", data_offset - BLOCK)
                    pending_size = int(records["size"])
            elif typeflag == b"L":
                pending_name = payload.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            elif typeflag == b"g":
                member_start = None
            continue
        if pending_name is not None:
            name = pending_name
        if pending_size is not None:
            size = pending_size
            pos = data_offset + _padded(size)
        start, member_start, pending_name, pending_size = member_start, None, None, None
        where = f"{path}: member {name!r} at byte {start}"
        if typeflag in (b"1", b"2"):
            raise UnsafeMemberError("tar holds a link; links are never followed", where,
                                    "replace links with regular files")
        if typeflag in (b"3", b"4", b"6"):
            raise UnsafeMemberError("tar holds a device or FIFO member", where, "remove it from the tar")
        if typeflag == b"S":
            raise TarFormatError("sparse members are not supported", where,
                                 "re-create the tar without --sparse", start)
        if typeflag == b"5":
            check_member_name(name, where)
            continue
        name = check_member_name(name, where)
        if typeflag not in _REGULAR:  # unknown types: tarfile and energon do not treat them as files
            if seekable:
                f.seek(pos)
            elif _skip(f, _padded(size)) < size:
                raise TarFormatError(f"tar is truncated inside member {name!r}", path,
                                     "re-create or re-download this shard", start)
            continue
        member = Member(name, start, data_offset, size)
        data: bytes | None = None
        if read_data:
            chunk = _read_exact(f, _padded(size))
            if len(chunk) < size:
                raise TarFormatError(f"tar is truncated: member {name!r} needs {size} bytes at byte "
                                     f"{data_offset}, file ends at byte {data_offset + len(chunk)}",
                                     path, "re-create or re-download this shard", start, name)
            data = chunk[:size]
        elif seekable:
            f.seek(pos)
        elif _skip(f, _padded(size)) < size:
            raise TarFormatError(f"tar is truncated inside member {name!r}", path,
                                 "re-create or re-download this shard", start, name)
        yield member, data


def iter_samples(
    f: BinaryIO, path: str, *, read_data: bool = False, skipped: list[tuple[str, str]] | None = None,
    seekable: bool = True, file_size: int | None = None, archive_end: list[int] | None = None,
) -> Iterator[Sample]:
    """Group consecutive members by WebDataset key; metadata members (`__x__`, `__x__/...`, energon's
    rule) and names without an extension are passed over (recorded in `skipped`). A key that
    reappears later in the tar is an error.

    With `file_size`, a member whose data would run past the end of the file raises `TarFormatError`
    before its sample is yielded, so every yielded sample is whole. When reading fails at a header (a
    corrupt or cut one), the sample before it is whole up to there and is yielded before the error: every
    sample whose members all end at or before the damage comes out. `archive_end` is as in `iter_members`.
    """
    current: Sample | None = None
    seen: set[str] = set()
    members = iter_members(f, path, read_data=read_data, seekable=seekable, archive_end=archive_end)
    while True:
        try:
            member, data = next(members)
        except StopIteration:
            break
        except TarFormatError as err:
            if current is not None and _ends_before(current, err):
                yield current
            raise
        parts = None if is_meta_name(member.name) else split_key(member.name)
        if current is not None and parts is not None and parts[0] != current.key:
            yield current  # whole: the next sample's first member follows it
            current = None
        end = member.end
        if file_size is not None and end > file_size:  # data and its padding: tar pads every member
            raise TarFormatError(
                f"tar is truncated at byte {file_size}: member {member.name!r} needs bytes up to "
                f"{member.end}",
                path, "re-create or re-download this shard",
                current.offset if current else member.header_offset)
        if parts is None:
            if skipped is not None:
                why = "metadata member" if is_meta_name(member.name) else "no extension, so no sample key"
                skipped.append((member.name, why))
            continue
        key, ext = parts
        if current is not None and current.key == key:
            if ext in current.members:
                raise TarFormatError(f"sample {key!r} has two {ext!r} members", path,
                                     "remove the duplicate member", member.header_offset)
            current.members[ext] = member
            current.end = end
            if current.data is not None and data is not None:
                current.data[ext] = data
            continue
        if key in seen:
            raise TarFormatError(f"key {key!r} appears twice, apart, in one tar", path,
                                 "write each sample's members next to each other", member.header_offset)
        seen.add(key)
        current = Sample(key, {ext: member}, member.header_offset, end,
                         {ext: data} if data is not None else None)
    if current is not None:
        yield current


def _ends_before(sample: Sample, err: TarFormatError) -> bool:
    """Whether damage reported by `iter_members` leaves `sample` whole: all of it lies before the damage,
    and the damage is not a cut member of its own (whose header was read: `err.member`)."""
    if sample.end > err.offset:
        return False
    parts = None if err.member is None or is_meta_name(err.member) else split_key(err.member)
    return parts is None or parts[0] != sample.key


def scan_tar(path: str | os.PathLike[str], *, tolerate_damage: bool = False) -> TarScan:
    """Scan a shard's samples from its headers. With `tolerate_damage`, a truncated or corrupt tar (or an
    empty file) gives every sample whose members all end at or before the damage, and the error in
    `.error`, instead of raising.

    Plain tars (img2dataset's and prep's own) take the bulk path of `tar_bulk`; anything it declines
    (pax names, links, metadata members, damage, ...) is read here header by header, errors included."""
    p = str(path)
    try:
        fast = _plain_scan(p)
    except OSError:
        fast = None  # the exact path below reports it
    if fast is not None and (fast.samples or os.path.getsize(p)):
        return fast
    skipped: list[tuple[str, str]] = []
    samples: list[Sample] = []
    end: list[int] = []
    try:
        size = os.path.getsize(p)
        if size == 0:  # even a tar of no members holds its end blocks: this one was never written
            raise TarFormatError("the file is empty (0 bytes), so it is no tar", p,
                                 "re-download or re-create it, or delete it")
        with open(p, "rb", buffering=0) as raw:
            f = io.BufferedReader(raw, buffer_size=BLOCK)
            for s in iter_samples(f, p, skipped=skipped, file_size=size, archive_end=end):
                samples.append(s)
    except FileNotFoundError:
        raise PrepError("shard not found", p, "check the path") from None
    except OSError as err:
        raise PrepError(f"cannot read shard ({err.strerror or err})", p,
                        "check the path and its permissions") from None
    except TarFormatError as err:
        if not tolerate_damage:
            raise
        return TarScan(p, samples, skipped, samples[-1].end if samples else 0, err)
    return TarScan(p, samples, skipped, end[0] if end else 0)


def shard_files(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Every `*.tar` file under `folder` (or directly in it), none inside a hidden folder such as
    .prep/ or .nv-meta/ and none hidden itself, sorted by relative POSIX path."""
    found = [p for p in folder.glob("**/*.tar" if recursive else "*.tar")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def shard_folder(folder: Path, fix: str, *, recursive: bool = True) -> list[Path]:
    """`shard_files` of a folder a stage or command must read: a missing folder, or a file where the
    folder should be, is one error with the caller's fix."""
    if not folder.is_dir():
        what = "is a file, not a folder of shards" if folder.is_file() else "folder does not exist"
        raise PrepError(what, str(folder), fix)
    return shard_files(folder, recursive=recursive)


def _plain_scan(path: str) -> TarScan | None:
    """`scan_tar` for a tar `walk_plain` accepts: the same samples, grouped as `iter_samples` groups them
    (None when a key repeats apart or a sample has an extension twice: the exact path says where).
    Walked and grouped in C where `_tarnative` was built, else `walk_plain` and `_group_plain`."""
    if _NATIVE_SCAN is None:
        walk = walk_plain(path)
        if walk is None:
            return None
        with gc_paused():
            return _group_plain(path, walk)
    fd = os.open(path, os.O_RDONLY)
    try:
        with gc_paused():
            got = _NATIVE_SCAN(fd, os.fstat(fd).st_size, Member, Sample)
    finally:
        os.close(fd)
    return None if got is None else TarScan(path, got[0], [], got[1])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while making many acyclic records (tuples, dicts): every burst of
    allocations would otherwise start a collection that walks all live objects, the scans a stage keeps
    included (~10% of a scan, ~4% of a repack task). Left alone when it is already off, so it never
    stays off by our doing."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _group_plain(path: str, walk: PlainWalk) -> TarScan | None:
    samples: list[Sample] = []
    seen: set[str] = set()
    cur: Sample | None = None
    for start, header, size, name in zip(walk.starts, walk.headers, walk.sizes, walk.names, strict=True):
        key, ext = name.split(".", 1)
        end = header + BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
        member = Member(name, start, header + BLOCK, size)
        if cur is not None and cur.key == key:
            if ext in cur.members:
                return None
            cur.members[ext] = member
            cur.end = end
        else:
            if key in seen:
                return None
            seen.add(key)
            cur = Sample(key, {ext: member}, start, end)
            samples.append(cur)
    return TarScan(path, samples, [], walk.end)


# ---------------------------------------------------------------------------------------------- writing


class FileSlice(NamedTuple):
    """Member data that stays in another file until it is written: streamed, never held in memory.
    (A tuple, cheap to make per member; never `len()` it as data: use `.size`.)"""

    path: str
    offset: int
    size: int


MemberData = bytes | memoryview | FileSlice


@dataclass(slots=True)
class ShardInfo:
    """What was written: per-sample offsets (the `.idx`, N+1 values), total bytes and checksum."""

    path: str
    keys: list[str]
    offsets: list[int]
    bytes: int
    checksum: str  # ALGORITHM:hex (prep.formats.checksum)


def member_header(name: str, size: int) -> bytes:
    """A deterministic header (pax for long names): mode 0644, uid/gid 0, no owner names, fixed mtime.

    Short ASCII names (nearly all) patch name, size and checksum into a header tarfile made once:
    the same bytes as tarfile's, at a tenth of the cost per member (repacking is header-bound).
    """
    raw = name.encode("ascii") if name.isascii() else b""
    if 0 < len(raw) <= 100 and size < 8**11:
        size_field = b"%011o\0" % size
        checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
        return b"".join((raw.ljust(100, b"\0"), _HEADER_MODE, size_field, _HEADER_MTIME,
                         b"%06o\0 " % checksum, _HEADER_TAIL))
    return _tarfile_header(name, size)


def _short_header(raw_key: bytes, key_sum: int, raw_ext: tuple[bytes, int], size: int) -> bytes:
    """member_header() for a checked ASCII name of at most 100 bytes, from its parts' bytes and byte
    sums (the key's computed once per sample, the extension's once per shard)."""
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + key_sum + raw_ext[1] + sum(size_field)
    name_pad = _PADS[100 - len(raw_key) - len(raw_ext[0])]
    return b"".join((raw_key, raw_ext[0], name_pad, _HEADER_MODE, size_field, _HEADER_MTIME,
                     b"%06o\0 " % checksum, _HEADER_TAIL))


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


_HEADER_TEMPLATE = _tarfile_header("x", 0)[:BLOCK]
_HEADER_MODE, _HEADER_MTIME, _HEADER_TAIL = (
    _HEADER_TEMPLATE[100:124], _HEADER_TEMPLATE[136:148], _HEADER_TEMPLATE[156:])
# the checksum of a header is the sum of its bytes with the checksum field read as 8 spaces
_TEMPLATE_SUM = sum(_HEADER_MODE) + sum(_HEADER_MTIME) + 8 * 32 + sum(_HEADER_TAIL)


def _native() -> ModuleType | None:
    """The C helpers (`_tarnative.c`: `scan`, `layout`, `fill_members`), where they were built at install
    (a C compiler present); else None, and the Python versions serve."""
    try:
        return importlib.import_module("prep.formats._tarnative")
    except ImportError:
        return None


NATIVE = _native()

WRITE_BLOCK = 1 << 20  # output is assembled, written and hashed in blocks this size (stays in CPU cache)
# each block reaches the file in writes no larger than this: a 1 MiB or larger `write` makes Linux (6.x,
# ext4 with large folios) fill page cache folios of that order, carved from free memory a VM's free page
# reporting gave back to the host; their first touch cost 4-5x the copy itself there (1.2 vs 0.26 sys-s
# per GB, see docs/design-notes.md), while smaller writes reuse recently freed pages. (`cat` copies inside
# the kernel with copy_file_range and never meets this.)
WRITE_PIECE = 256 << 10
WRITEBACK_BLOCK = 8 << 20  # writeback is started for this much at a time (fewer, larger disk requests)
BULK_GAP = 1 << 12  # source members closer than this are read in one run (pax headers lie between them)
_SKIP = bytearray(BULK_GAP)  # where a run's bytes between members are read to (never looked at)
_IOV_MEMBERS = 500  # members per preadv: two buffers each, under Linux's IOV_MAX of 1024
_ZEROS = bytes(1 << 16)
_NATIVE_FILL = getattr(NATIVE, "fill_members", None)  # C block layout where `_tarnative` was built
_NATIVE_SCAN = getattr(NATIVE, "scan", None)  # C walk + grouping, likewise
_NATIVE_LAYOUT = getattr(NATIVE, "layout", None)  # C headers + columns of a bulk shard, likewise
_PADS = [bytes(n) for n in range(BLOCK)]  # zero padding by length, made once
_FADVISE = hasattr(os, "posix_fadvise")
_SIMPLE_KEY = re.compile(PLAIN_KEY, re.ASCII)  # a key member_name() always accepts...
_SIMPLE_EXT = re.compile(PLAIN_EXT, re.ASCII)  # ...with any such extension: no need to check each name
_SIMPLE_KEYS = re.compile(rf"(?:{PLAIN_KEY}\n)*", re.ASCII)  # the same, for a whole shard's lines at once
_SIMPLE_EXTS = re.compile(rf"(?:{PLAIN_EXT}\n)*", re.ASCII)


class _BlockSink:
    """The output file, written in large blocks from one reusable buffer.

    Copying is cheap only in bulk: member data is read from its source straight into the buffer (one
    `preadv` for a run of members that lie back to back in one source, as consecutive samples of a tar
    do), then headers and zero padding are put over whatever the source held between them, and a full
    buffer costs one checksum update (XXH3: a tenth of the copy's cost, so inline) and a few `write`s
    of WRITE_PIECE.
    With `writeback`, a helper thread starts writing each few MiB to disk as soon as they are written
    (the call may block while the disk's queue is full: there, not here), so disk and copy overlap and
    the fsync that ends the shard waits only for its tail (which alone makes the shard durable: a failed
    head start costs only time).
    """

    __slots__ = ("block", "buf", "f", "fds", "fill", "flushed", "hasher", "mv", "patch_at", "patch_data",
                 "run_dst", "run_end", "run_next", "run_path", "run_src", "syncer", "writeback")

    def __init__(self, f: BinaryIO, *, writeback: bool) -> None:
        self.f = f
        self.writeback = 0  # where writeback has not been started yet
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="prep-writeback") if writeback else None
        self.block = WRITE_BLOCK
        self.buf = bytearray(self.block)
        self.mv = memoryview(self.buf)
        self.fill = 0  # bytes of the buffer in use (a pending run's bytes included)
        self.flushed = 0  # bytes handed to the file before the buffer
        self.hasher = new_hasher()
        self.fds: dict[str, int] = {}
        # the pending run: its source, first data byte there and here, the source offset the next member's
        # data must start at to join it, where its data ends, and what to put over the bytes read
        self.run_path: str | None = None
        self.run_src = self.run_dst = self.run_next = self.run_end = 0
        self.patch_at: list[int] = []
        self.patch_data: list[bytes] = []

    @property
    def pos(self) -> int:
        return self.flushed + self.fill

    def flush(self) -> None:
        self.close_run()
        if not self.fill:
            return
        view = self.mv[: self.fill]
        self.hasher.update(view)
        while view:
            view = view[self.f.write(view[:WRITE_PIECE]):]
        self.flushed += self.fill
        self.fill = 0
        if self.syncer is not None and self.flushed - self.writeback >= WRITEBACK_BLOCK:
            start, self.writeback = self.writeback, self.flushed
            self.syncer.submit(start_writeback, self.f.fileno(), start, self.flushed - start)

    def put(self, data: bytes | memoryview) -> None:
        """Append bytes, across as many blocks as they need."""
        self.close_run()
        view = memoryview(data).cast("B")
        while view:
            if self.fill == self.block:
                self.flush()
            n = min(len(view), self.block - self.fill)
            self.mv[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]

    def zeros(self, n: int) -> None:
        while n:
            k = min(n, len(_ZEROS))
            self.put(_ZEROS[:k])
            n -= k

    def data_member(self, header: bytes, data: bytes | memoryview) -> None:
        """Append a member whose data is in memory."""
        self.close_run()
        size = len(data)
        pad = -size % BLOCK
        need = len(header) + size + pad
        if self.fill + need > self.block:
            self.flush()
        if need > self.block:
            self.put(header)
            self.put(data)
            self.zeros(pad)
            return
        fill, mv = self.fill, self.mv
        mv[fill : fill + len(header)] = header
        fill += len(header)
        mv[fill : fill + size] = data if isinstance(data, bytes) else memoryview(data).cast("B")
        fill += size
        mv[fill : fill + pad] = _PADS[pad]
        self.fill = fill + pad

    def member(self, header: bytes, sl: FileSlice) -> None:
        """Append a member whose data stays in a source file: joined to the pending run when it follows
        the run's last member in that source (one 512-byte header apart, as in any tar), else a new run."""
        size = sl.size
        pad = -size % BLOCK
        fill = self.fill
        if (sl.offset == self.run_next and sl.path == self.run_path and len(header) == BLOCK
                and fill + BLOCK + size + pad <= self.block):
            self.patch_at.append(fill)
            self.patch_data.append(header)
            fill += BLOCK
        else:
            self.close_run()
            need = len(header) + size + pad
            if fill + need > self.block:
                self.flush()
                fill = 0
            if need > self.block:  # a member larger than a block is streamed through the buffers
                self.put(header)
                self._stream(sl)
                self.zeros(pad)
                return
            self.mv[fill : fill + len(header)] = header
            fill += len(header)
            self.run_path, self.run_src, self.run_dst = sl.path, sl.offset, fill
        fill += size
        if pad:
            self.patch_at.append(fill)
            self.patch_data.append(_PADS[pad])
            fill += pad
        self.fill = fill
        self.run_end = sl.offset + size
        self.run_next = self.run_end + pad + BLOCK

    def close_run(self) -> None:
        """Read the pending run's bytes into place, then put its later headers and its zero padding over
        what the source held there."""
        if self.run_path is None:
            return
        path, self.run_path = self.run_path, None
        self._read(path, self.mv[self.run_dst : self.run_dst + self.run_end - self.run_src], self.run_src)
        mv = self.mv
        for at, data in zip(self.patch_at, self.patch_data, strict=True):
            mv[at : at + len(data)] = data
        self.patch_at.clear()
        self.patch_data.clear()

    def _fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
            if _FADVISE:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _read(self, path: str, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset` of a source, or raise TarFormatError when the source is shorter."""
        fd = self._fd(path)
        got, want = os.preadv(fd, [view], offset), len(view)
        while got < want:
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise TarFormatError(f"source ended {want - got} bytes early while copying a member",
                                     path, "re-create the source shard", offset + got)
            got += n

    def _readv(self, path: str, views: list[memoryview], offset: int, want: int) -> None:
        """Fill `views` (`want` bytes in all) in order from `offset` of a source: one `preadv` unless the
        read comes up short."""
        got = os.preadv(self._fd(path), views, offset)
        if got == want:
            return
        for view in views:  # short: finish each view (or say where the source ended)
            if got < len(view):
                self._read(path, view[got:], offset + got)
            got = max(got - len(view), 0)
            offset += len(view)

    def _stream(self, sl: FileSlice) -> None:
        offset, left = sl.offset, sl.size
        while left:
            if self.fill == self.block:
                self.flush()
            n = min(left, self.block - self.fill)
            self._read(sl.path, self.mv[self.fill : self.fill + n], offset)
            self.fill += n
            offset += n
            left -= n

    def bulk(self, layout: _Bulk) -> None:
        """Append many members whose data lie in source files (`paths[src[i]]`, `data_offsets[i]`), each
        with a 512-byte header, as `layout` places them: a block at a time, the per-member work in numpy.

        Per block: the sources are read in runs (members of one source at most BULK_GAP apart cost one
        `preadv`, even with pax headers between them), each member's data is read into place, then
        headers and zero padding are put in (in C where `_tarnative` was built, else `_fill_block`)."""
        self.flush()
        paths, src, offsets, sizes, headers = (layout.paths, layout.src, layout.data_offsets, layout.sizes,
                                               layout.headers)
        n = len(sizes)
        starts, ends = layout.member_starts[:-1], layout.member_starts[1:]
        fds = np.array([self._fd(p) for p in paths], dtype=np.int64)[src]
        i = 0
        while i < n:
            base = int(starts[i])
            j = int(np.searchsorted(ends, base + self.block, "right"))
            if j == i:  # one member larger than a block: streamed through the buffers
                self.put(headers[i].tobytes())
                self._stream(FileSlice(paths[int(src[i])], int(offsets[i]), int(sizes[i])))
                self.zeros(-int(sizes[i]) % BLOCK)
                self.flush()
                i += 1
                continue
            dst = starts[i:j] - base + BLOCK
            if _NATIVE_FILL is None:
                self._fill_block(dst, fds[i:j], offsets[i:j], sizes[i:j], headers[i:j])
            else:
                short = _NATIVE_FILL(self.buf, dst, fds[i:j], offsets[i:j], sizes[i:j], headers[i:j])
                if short is not None:
                    k, missing, at = short
                    raise TarFormatError(f"source ended {missing} bytes early while copying a member",
                                         paths[int(src[i + k])], "re-create the source shard", at)
            self.fill = int(ends[j - 1]) - base
            self.flush()
            i = j

    def _fill_block(self, dst: np.ndarray, fds: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                    headers: np.ndarray) -> None:
        """Lay members out in the buffer as `_tarnative.fill_members` does: one scattered `preadv` per
        run, each member's data landing at `dst`, the bytes between members (padding, pax and ustar
        headers) in a scratch block; then every header before its data and zeros after it, in numpy."""
        data_end = offsets + sizes
        gap = offsets[1:] - data_end[:-1]
        cuts = np.flatnonzero((fds[1:] != fds[:-1]) | (gap < 0) | (gap > BULK_GAP)
                              | (np.arange(1, len(sizes)) % _IOV_MEMBERS == 0)) + 1
        gaps = np.concatenate((gap.clip(0, None), [0])).tolist()
        # a few gap lengths repeat; a longer one only ends a run (its view is dropped below)
        skips = {g: memoryview(_SKIP)[: min(g, BULK_GAP)] for g in set(gaps)}
        mv, path_of = self.mv, {fd: path for path, fd in self.fds.items()}
        dst_list, end_list = dst.tolist(), (dst + sizes).tolist()
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(sizes)], strict=True):
            views: list[memoryview] = []
            add = views.extend
            for d, end, g in zip(dst_list[a:b], end_list[a:b], gaps[a:b], strict=True):
                add((mv[d:end], skips[g]))
            views.pop()
            lo = int(offsets[a])
            self._readv(path_of[int(fds[a])], views, lo, int(data_end[b - 1]) - lo)
        rows = dst // BLOCK - 1
        out = np.frombuffer(self.buf, dtype=np.uint8).reshape(-1, BLOCK)
        rem = sizes % BLOCK
        partial = rem > 0
        last = rows[partial] + 1 + (sizes[partial] - 1) // BLOCK
        out[last] *= np.arange(BLOCK)[None, :] < rem[partial][:, None]  # zero padding after the data
        out[rows] = headers

    def finish(self) -> str:
        """Write what is left and return the checksum of every byte written."""
        self.flush()
        self.close()
        return checksum_of(self.hasher)

    def close(self) -> None:
        """Wait for the writeback thread and close the sources (also after an error)."""
        if self.syncer is not None:
            self.syncer.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


SampleItem = tuple[str, Mapping[str, MemberData]]


def sorted_samples(samples: Iterable[SampleItem]) -> list[SampleItem]:
    """Samples in the writer's order: by key. A duplicate key is an error (it would split a sample)."""
    out = sorted(samples, key=lambda s: s[0])
    for a, b in itertools.pairwise(out):
        if a[0] == b[0]:
            raise PrepError(f"sample key {a[0]!r} given twice", None, "make sample keys unique")
    return out


def write_shard(
    path: str | os.PathLike[str],
    samples: Iterable[SampleItem],
    *,
    sort: bool = True,
    fsync: bool = True,
) -> ShardInfo:
    """Write samples as one shard, members sorted by key then extension, atomically (temp + rename).

    Member data may be bytes (or a memoryview) or a `FileSlice` copied straight from another tar; the
    output is assembled, written and hashed in large blocks (see `_BlockSink`). Returns the `.idx` offsets and
    the checksum of exactly the bytes written. `fsync` makes the shard durable before the rename.
    """
    final = Path(path)
    items = sorted_samples(samples) if sort else list(samples)
    if not sort and len({k for k, _ in items}) != len(items):
        raise PrepError("a sample key is given twice", str(final), "make sample keys unique")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    where = str(final)
    keys = [k for k, _ in items]
    bulk = _bulk_members(items)
    try:
        with open(tmp, "wb", buffering=0) as raw:
            out = _BlockSink(raw, writeback=fsync)
            try:
                if bulk is not None:
                    out.bulk(bulk)
                    offsets = bulk.offsets
                else:
                    offsets = _write_members(out, items, where)
                out.zeros(_padded_record(out.pos + 2 * BLOCK) - out.pos)
                checksum = out.finish()
                if fsync:
                    os.fsync(raw.fileno())
            finally:
                out.close()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(str(final), keys, offsets, out.pos, checksum)


@dataclass
class _Bulk:
    """A shard whose members all come from files, laid out for `_BlockSink.bulk`."""

    paths: list[str]
    src: np.ndarray
    data_offsets: np.ndarray
    sizes: np.ndarray
    headers: np.ndarray
    member_starts: np.ndarray  # where each member's header goes in the shard, then where the last ends
    offsets: list[int]  # each sample's first header, then where the last member ends (N+1 values)


def _bulk_members(items: list[SampleItem]) -> _Bulk | None:
    """The bulk layout when every member is a FileSlice with a short plain name (one 512-byte header,
    the same bytes `member_header` makes), else None. In C where `_tarnative` was built, else
    `_bulk_columns` (the same headers and columns, or the same None)."""
    if _NATIVE_LAYOUT is None:
        columns = _bulk_columns(items)
    else:
        got = _NATIVE_LAYOUT(items, FileSlice, _HEADER_TEMPLATE)
        columns = None if got is None else (
            np.frombuffer(got[0], dtype=np.uint8).reshape(-1, BLOCK), got[1],
            *(np.frombuffer(col, dtype=np.int64) for col in got[2:]))
    if columns is None:
        return None
    headers, paths, src, data_offsets, size_arr, counts = columns
    member_starts = np.concatenate(([0], np.cumsum(BLOCK + (size_arr + BLOCK - 1) // BLOCK * BLOCK)))
    first = np.concatenate(([0], np.cumsum(counts)))
    return _Bulk(paths, src, data_offsets, size_arr, headers, member_starts, member_starts[first].tolist())


_Columns = tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _bulk_columns(items: list[SampleItem]) -> _Columns | None:
    """Headers, source paths, and per member its source's index, data offset and size, then members per
    sample; None unless every member is a FileSlice with a short plain name. The names are checked once
    for the whole shard."""
    names: list[str] = []
    src: list[int] = []
    data_offsets: list[int] = []
    sizes: list[int] = []
    counts: list[int] = []
    path_ids: dict[str, int] = {}
    exts: set[str] = set()
    for key, members in items:
        counts.append(len(members))
        for ext in sorted(members):
            d = members[ext]
            if type(d) is not FileSlice:
                return None
            names.append(f"{key}.{ext}")
            src.append(path_ids.setdefault(d.path, len(path_ids)))
            data_offsets.append(d.offset)
            sizes.append(d.size)
            exts.add(ext)
    keys, ext_lines = "".join(k + "\n" for k, _ in items), "".join(e + "\n" for e in exts)
    if (not names or max(map(len, names)) > 100 or max(sizes) >= 8**11
            or keys.count("\n") != len(items) or ext_lines.count("\n") != len(exts)  # no newline inside
            or not _SIMPLE_KEYS.fullmatch(keys) or not _SIMPLE_EXTS.fullmatch(ext_lines)):
        return None
    size_arr = np.asarray(sizes, dtype=np.int64)
    return (plain_headers(_HEADER_TEMPLATE, names, size_arr), list(path_ids), np.asarray(src, dtype=np.int64),
            np.asarray(data_offsets, dtype=np.int64), size_arr, np.asarray(counts, dtype=np.int64))


def _write_members(out: _BlockSink, items: list[SampleItem], where: str) -> list[int]:
    """Append every sample's members (sorted by extension) one by one, checking names that are not
    plainly safe; returns the `.idx` offsets (each sample's first header, then the end)."""
    offsets: list[int] = []
    simple_exts: dict[str, tuple[bytes, int]] = {}  # ".ext" as bytes, and its byte sum
    for key, members in items:
        offsets.append(out.pos)
        raw_key = key.encode() if _SIMPLE_KEY.fullmatch(key) else None
        key_sum = sum(raw_key) if raw_key is not None else 0
        for ext in sorted(members):
            data = members[ext]
            size = data.size if isinstance(data, FileSlice) else len(data)
            raw_ext = simple_exts.get(ext) if raw_key is not None else None
            if raw_key is not None and raw_ext is not None and len(raw_key) + len(raw_ext[0]) <= 100 \
                    and size < 8**11:
                header = _short_header(raw_key, key_sum, raw_ext, size)
            else:
                name = member_name(key, ext, where)
                if raw_key is not None and _SIMPLE_EXT.fullmatch(ext):
                    dot_ext = b"." + ext.encode()
                    simple_exts[ext] = (dot_ext, sum(dot_ext))
                header = member_header(name, size)
            if isinstance(data, FileSlice):
                out.member(header, data)
            else:
                out.data_member(header, data)
    offsets.append(out.pos)
    return offsets


def _padded_record(n: int) -> int:
    return (n + RECORD - 1) // RECORD * RECORD


def read_member(f: BinaryIO, member: Member) -> bytes:
    f.seek(member.data_offset)
    return _read_exact(f, member.size)
