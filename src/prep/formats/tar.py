"""Reading WebDataset shards (POSIX tars): a header scanner that seeks over data (the writer is
`tar_write`, the member-name rule `names`, the fast paths `tar_bulk` and `tar_native`).

The scanner reads 512-byte headers only (pax and GNU long names included) so counting and indexing a
shard costs one header read per member, not a read of its data. Member names are never trusted as
paths: absolute names, `..` components and links are refused.
"""

from __future__ import annotations

import gc
import io
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from prep.errors import PrepError
from prep.formats.names import (
    UnsafeMemberError,
    check_member_name,
    is_meta_name,
    split_key,
)
from prep.formats.tar_bulk import PlainWalk, walk_plain
from prep.formats.tar_native import NATIVE

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as GNU tar and Python's tarfile do
MAX_EXTENDED_HEADER = 1 << 20  # pax / GNU long-name payloads are read into memory: refuse absurd ones
FIXED_MTIME = 0  # shards carry no wall-clock time, so the same samples give the same bytes
_REGULAR = (b"0", b"\x00", b"7")  # regular file, old-style regular file, contiguous file
_ZERO_BLOCK = bytes(BLOCK)
_ARCHIVE_ROOT = (".", "./")  # the folder `tar -cf x.tar -C DIR .` archives first: safe, and no sample
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
            if name not in _ARCHIVE_ROOT:
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
                                 "write each sample's members next to each other (tar --sort=name)",
                                 member.header_offset)
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


def shard_files(folder: Path, *, recursive: bool = True, skip: Path | None = None) -> list[Path]:
    """Every `*.tar` file under `folder` (or directly in it), none inside a hidden folder such as
    .prep/ or .nv-meta/ and none hidden itself, sorted by relative POSIX path. None under `skip` either:
    a stage's output folder inside its input folder holds its own shards, which are not its input."""
    inner: tuple[str, ...] = ()  # skip's path below folder (none when it is folder or elsewhere)
    if skip is not None and skip.resolve().is_relative_to(folder.resolve()):
        inner = skip.resolve().relative_to(folder.resolve()).parts
    found = []
    for p in folder.glob("**/*.tar" if recursive else "*.tar"):
        parts = p.relative_to(folder).parts
        if p.is_file() and not any(part.startswith(".") for part in parts) and (
                not inner or parts[: len(inner)] != inner):
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def shard_folder(folder: Path, fix: str, *, recursive: bool = True, skip: Path | None = None) -> list[Path]:
    """`shard_files` of a folder a stage or command must read: a missing folder, or a file where the
    folder should be, is one error with the caller's fix."""
    if not folder.is_dir():
        what = "is a file, not a folder of shards" if folder.is_file() else "folder does not exist"
        raise PrepError(what, str(folder), fix)
    return shard_files(folder, recursive=recursive, skip=skip)


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






_NATIVE_SCAN = getattr(NATIVE, "scan", None)  # C walk + grouping where `_tarnative` was built


def read_member(f: BinaryIO, member: Member) -> bytes:
    f.seek(member.data_offset)
    return _read_exact(f, member.size)
