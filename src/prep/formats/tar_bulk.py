"""Bulk paths for the common tar: plain headers, short ASCII names, regular files only.

Repacking is bound by per-member Python work, not by bytes: at ~20-70 KB a sample a gigabyte holds
45,000-150,000 members, so a few microseconds each cost more than copying the bytes. These paths keep
the Python work per member to a few list operations and do the rest with numpy over all members at
once. The scan declines (None) anything unusual, and the exact scanner in `tar.py` takes over, so errors
are still reported there, in one place, with their offsets; `tar.py` uses the header builder only for
shards whose names it has checked for the whole shard at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from prep.formats.names import PLAIN_EXT, PLAIN_KEY

BLOCK = 512
_SIZE = slice(124, 136)
# a pax header the bulk path passes over: one record that changes nothing prep reads (a time, an owner);
# any other record (path, size, ...) goes the exact way
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,2}) (?:mtime|atime|ctime|uid|gid|uname|gname)=[^\n]*\n")
_PLAIN_NAMES = re.compile(rf"(?:{PLAIN_KEY}\.{PLAIN_EXT}\n)*", re.ASCII)  # every name a bulk scan accepts
_CHECKSUM_FIELD = slice(148, 156)
_OCTAL11 = re.compile(rb"([0-7]+)[\0 ]*")  # a size field's first 11 bytes as the walk accepts them


@dataclass
class PlainWalk:
    """A tar's regular members, read from their headers: offsets (first header incl. pax, the ustar header),
    sizes, names, and where the archive ends. Only produced when every header is plain and valid."""

    starts: list[int]
    headers: list[int]
    sizes: list[int]
    names: list[str]
    end: int


def _byte_sums(hdr: np.ndarray) -> np.ndarray:
    """Each 512-byte row's byte sum: bytes added pairwise in 16-bit lanes of 64-bit words (at most
    64 * 510 per lane, no overflow), a third of the cost of a plain uint8 sum."""
    words = np.ascontiguousarray(hdr).view(np.uint64)
    mask = np.uint64(0x00FF00FF00FF00FF)
    lanes = ((words & mask) + ((words >> np.uint64(8)) & mask)).sum(axis=1)
    low = np.uint64(0xFFFF)
    total = (lanes & low) + ((lanes >> np.uint64(16)) & low) + ((lanes >> np.uint64(32)) & low)
    return (total + (lanes >> np.uint64(48))).astype(np.int64)


def _fields_hold(hdr: np.ndarray, sizes: np.ndarray) -> bool:
    """Every header's size field says `sizes` (read by the walk from its first 11 bytes) and its checksum
    is right. Fields as tarfile and GNU tar write them are compared as bytes; other shapes are parsed."""
    end = hdr[:, 135]
    if not (np.array_equal(hdr[:, 124:135], octal_columns(sizes, 11)) and ((end == 0) | (end == 32)).all()):
        parsed = _octal_fields(hdr[:, _SIZE])
        if parsed is None or not np.array_equal(parsed, sizes):
            return False  # a size field of another shape (12 digits, leading spaces) than the walk read
    field = hdr[:, _CHECKSUM_FIELD]
    want = _byte_sums(hdr) - field.sum(axis=1, dtype=np.int64) + 8 * 32
    if (np.array_equal(field[:, :6], octal_columns(want, 6)) and (field[:, 6] == 0).all()
            and (field[:, 7] == 32).all()):
        return True
    stored = _octal_fields(field)
    return stored is not None and np.array_equal(stored, want)


def _octal_fields(fields: np.ndarray) -> np.ndarray | None:
    """Octal numbers in fixed-width fields (rows of bytes): digits, then NULs/spaces. None if any row is not
    that shape (leading spaces, base-256, junk): the exact parser decides those."""
    digit = (fields >= 48) & (fields <= 55)
    pad = (fields == 0) | (fields == 32)
    ndig = digit.sum(axis=1)
    width = fields.shape[1]
    # digits must be a prefix, the rest padding
    prefix = np.arange(width)[None, :] < ndig[:, None]
    if not np.array_equal(digit, prefix) or not (pad | prefix).all() or (ndig == 0).any():
        return None
    weights = np.zeros((fields.shape[0], width), dtype=np.int64)
    exp = ndig[:, None] - 1 - np.arange(width)[None, :]
    np.left_shift(1, 3 * np.clip(exp, 0, None), out=weights, where=prefix)
    return ((fields.astype(np.int64) - 48) * weights * prefix).sum(axis=1)


def walk_plain(path: str) -> PlainWalk | None:
    """The members of a plain tar, or None when the exact scanner must look (pax records other than
    times and owners, GNU long names, links, directories, unusual names, checksum or field oddities,
    damage).

    The header chain is followed with one `pread` per member; checksums, name rules and field formats
    are then checked for all headers at once (`_tarnative.scan` does the same in C, decline for
    decline, where it was built). A `pread` costs less than the page fault of a memory map here, and
    releases the GIL (threads scanning several tars overlap their waits).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return _walk(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class Chain(NamedTuple):
    """The header chain as walked, before the checks over all headers: each regular member's first
    header (its pax header, if any), ustar header and size; the member headers and the pax headers
    passed over (512 bytes each, in order), the pax records' lengths, and where the archive ends."""

    starts: list[int]
    headers: list[int]
    sizes: list[int]
    member_blocks: bytes
    pax_blocks: bytes
    pax_sizes: list[int]
    end: int


def _chain_python(fd: int, size: int) -> Chain | None:
    """Follow the header chain with one `pread` per member (its pax header, pax record and ustar header
    lie in the same 1.5 KB, as img2dataset writes them)."""
    starts: list[int] = []
    headers: list[int] = []
    sizes: list[int] = []
    member_blocks: list[bytes] = []
    pax_blocks: list[bytes] = []
    pax_sizes: list[int] = []
    pax_ok, octal, pread = _PAX_RECORD.fullmatch, _OCTAL11.fullmatch, os.pread
    p, limit = 0, size - BLOCK
    while p <= limit:
        buf = pread(fd, 3 * BLOCK, p)
        if len(buf) < BLOCK:
            return None  # the file shrank under us
        q, t = 0, buf[156]
        if t == 120:  # 'x': a pax header; only one harmless record (a time, an owner) passes here
            m = octal(buf, 124, 135)
            n = int(m[1], 8) if m else BLOCK + 1
            m = pax_ok(buf, BLOCK, BLOCK + n) if n <= BLOCK and len(buf) == 3 * BLOCK else None
            if m is None or int(m[1]) != n:
                return None
            pax_blocks.append(buf[:BLOCK])
            pax_sizes.append(n)
            q, t = 2 * BLOCK, buf[2 * BLOCK + 156]
        if t == 48 or (t == 0 and buf[q] != 0):  # a regular file ('0', or NUL in old tars)
            # digits and padding in the first 11 bytes, as every common writer puts them; other shapes
            # go the exact way, and `_walk`'s checks compare each whole size field with this
            m = octal(buf, q + 124, q + 135)
            if m is None:
                return None
            n = int(m[1], 8)
            starts.append(p)
            headers.append(p + q)
            sizes.append(n)
            member_blocks.append(buf[q : q + BLOCK])
            p += q + BLOCK + (n + 511) // BLOCK * BLOCK
        elif q == 0 and buf[:BLOCK] == bytes(BLOCK):
            break  # the end-of-archive block
        else:
            return None  # a link, a directory, a GNU long name, ...: the exact scanner decides
    if p > size or (limit < p < size):
        return None  # the last member runs past the end of the file, or a partial block follows it
    return Chain(starts, headers, sizes, b"".join(member_blocks), b"".join(pax_blocks), pax_sizes, p)


def _walk(fd: int, size: int) -> PlainWalk | None:
    """The chain, then every check over all headers in numpy."""
    ch = _chain_python(fd, size)
    if ch is None:
        return None
    headers, sizes = ch.headers, ch.sizes
    if not headers:
        return PlainWalk([], [], [], [], ch.end)
    hdr = np.frombuffer(ch.member_blocks + ch.pax_blocks, dtype=np.uint8).reshape(-1, BLOCK)
    if not _fields_hold(hdr, np.asarray(sizes + ch.pax_sizes, dtype=np.int64)):
        return None
    real = hdr[: len(headers)]
    ustar = (real[:, 257:263] == np.frombuffer(b"ustar\0", dtype=np.uint8)).all(axis=1)
    if (real[:, 345:500].any(axis=1) & ustar).any():  # a ustar prefix: the name continues elsewhere
        return None
    # names end at their first NUL; bytes after it, or non-ASCII ones, fail the name rule below
    joined = b"\n".join(real[:, :100].copy().view("S100").ravel().tolist()).decode("latin-1") + "\n"
    names = joined.split("\n")[:-1]
    if len(names) != len(headers) or not _PLAIN_NAMES.fullmatch(joined):
        return None  # (a newline inside a name would have made two lines of it)
    return PlainWalk(ch.starts, headers, sizes, names, ch.end)


# ------------------------------------------------------------------------------------------------ writing


def octal_columns(values: np.ndarray, width: int) -> np.ndarray:
    """Each value as `width` octal digits (ASCII), zero-padded: numpy's version of `b"%0*o" % v`."""
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts[None, :]) & 7).astype(np.uint8) + 48


def plain_headers(template: bytes, names: list[str] | list[bytes], sizes: np.ndarray) -> np.ndarray:
    """Headers for members with short ASCII names, from a template header (mode, owner, mtime, magic):
    name, `%011o\\0` size and `%06o\\0 ` checksum filled in, as tarfile writes them, for all at once."""
    n = len(names)
    hdr = np.empty((n, BLOCK), dtype=np.uint8)
    hdr[:] = np.frombuffer(template, dtype=np.uint8)
    hdr[:, :100] = np.array(names, dtype="S100").view(np.uint8).reshape(n, 100)
    hdr[:, 124:135] = octal_columns(sizes, 11)
    hdr[:, 135] = 0
    hdr[:, _CHECKSUM_FIELD] = 32
    hdr[:, 148:154] = octal_columns(_byte_sums(hdr), 6)
    hdr[:, 154] = 0
    return hdr
