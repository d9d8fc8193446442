"""Writing WebDataset shards: members sorted by key, fixed metadata, so the same samples give the same
bytes; a bulk path (one scattered read per run of source members, headers built at once, in C where
built) and the exact member-by-member path for everything else."""

from __future__ import annotations

import itertools
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from prep.errors import PrepError
from prep.formats.atomic import start_writeback, temp_name
from prep.formats.checksum import checksum_of, new_hasher
from prep.formats.names import (
    PLAIN_EXT,
    PLAIN_KEY,
    member_name,
)
from prep.formats.tar import BLOCK, FIXED_MTIME, RECORD, TarFormatError
from prep.formats.tar_bulk import plain_headers
from prep.formats.tar_native import NATIVE


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


WRITE_BLOCK = 1 << 20  # output is assembled, written and hashed in blocks this size (stays in CPU cache)


# each block reaches the file in writes no larger than this: a 1 MiB or larger `write` makes Linux (6.x,
# ext4 with large folios) fill page cache folios of that order, carved from free memory a VM's free page
# reporting gave back to the host; their first touch cost 4-5x the copy itself there (1.2 vs 0.26 sys-s
# per GB, see docs/design-notes.md), while smaller writes reuse recently freed pages. (`cat` copies inside
# the kernel with copy_file_range and never meets this.)
WRITE_PIECE = 256 << 10


def pwrite_pieces(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of `data` at `offset` of `fd` in writes of at most WRITE_PIECE; return its length."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)
    return done


WRITEBACK_BLOCK = 8 << 20  # writeback is started for this much at a time (fewer, larger disk requests)


BULK_GAP = 1 << 12  # source members closer than this are read in one run (pax headers lie between them)


_SKIP = bytearray(BULK_GAP)  # where a run's bytes between members are read to (never looked at)


_IOV_MEMBERS = 500  # members per preadv: two buffers each, under Linux's IOV_MAX of 1024


_ZEROS = bytes(1 << 16)


_NATIVE_FILL = getattr(NATIVE, "fill_members", None)  # C block layout where `_tarnative` was built


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
