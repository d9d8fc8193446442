"""Bulk paths for the common tar: plain headers, short ASCII names, regular files only.

Repacking is bound by per-member Python work, not by bytes: at ~20-70 KB a sample a gigabyte holds
45,000-150,000 members, so a few microseconds each cost more than copying the bytes. These paths keep
the Python work per member to a few list operations and do the rest with numpy over all members at
once. Both say "not for me" (None / False) for anything unusual, and the exact paths in `tar.py` take
over, so errors are still reported there, in one place, with their offsets.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

BLOCK = 512
_SIZE = slice(124, 136)
# pax records passed over by the bulk path: they change nothing prep reads (any other goes the exact way)
_PAX_HARMLESS = frozenset((b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname", b"comment"))
# every name a fast scan accepts: relative, no `.`/`..` component, no metadata `__x__`, a key and an ext
_PLAIN_NAMES = re.compile(r"(?:(?!__)[\w-]+(?:/[\w-]+)*\.[\w.-]+\n)*", re.ASCII)
_CHECKSUM_FIELD = slice(148, 156)


@dataclass
class PlainWalk:
    """A tar's regular members, read from their headers: offsets (first header incl. pax, the ustar header),
    sizes, names, and where the archive ends. Only produced when every header is plain and valid."""

    starts: list[int]
    headers: list[int]
    sizes: list[int]
    names: list[str]
    end: int


def _map(path: str) -> tuple[mmap.mmap | bytes, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return (mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else b""), size
    finally:
        os.close(fd)


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
    times, GNU long names, links, directories, unusual names, checksum or size-field oddities, damage).

    The header chain is followed in Python over a memory map (no syscall per header); checksums, name
    rules and field formats are then checked for all headers at once.
    """
    mm, size = _map(path)
    try:
        return _walk(mm, size)
    finally:
        if isinstance(mm, mmap.mmap):
            mm.close()


def _walk(mm: mmap.mmap | bytes, size: int) -> PlainWalk | None:
    starts: list[int] = []
    headers: list[int] = []
    sizes: list[int] = []
    pax: list[int] = []
    p, start, limit = 0, -1, size - BLOCK
    try:
        while p <= limit:
            t = mm[p + 156]
            if t == 48 or t == 0:  # '0' or old-style NUL: a regular file (a NUL name is the end block)
                if mm[p] == 0:
                    break
                n = int(mm[p + 124 : p + 136].rstrip(b"\0 "), 8)
                starts.append(p if start < 0 else start)
                headers.append(p)
                sizes.append(n)
                start = -1
                p += BLOCK + (n + 511) // BLOCK * BLOCK
            elif t == 120:  # 'x': a pax header; only a single time record is passed over here
                n = int(mm[p + 124 : p + 136].rstrip(b"\0 "), 8)
                body = mm[p + BLOCK : p + BLOCK + n]
                length, _, record = body.partition(b" ")
                if (n > BLOCK or body[-1:] != b"\n" or not length.isdigit() or int(length) != n
                        or record.partition(b"=")[0] not in _PAX_HARMLESS):
                    return None
                pax.append(p)
                if start < 0:
                    start = p
                p += 2 * BLOCK
            else:
                return None
    except ValueError:  # a size field that is not plain octal
        return None
    if start >= 0:
        return None  # a pax header with no member after it
    if p <= limit:
        if mm[p : p + BLOCK] != bytes(BLOCK):
            return None
        end = p
    elif p == size:
        end = p  # no end-of-archive blocks: tolerated, as by the exact scanner
    else:
        return None  # the last member runs past the end of the file
    if not headers:
        return PlainWalk([], [], [], [], end)
    blocks = np.frombuffer(mm, dtype=np.uint8, count=size // BLOCK * BLOCK).reshape(-1, BLOCK)
    rows = np.asarray(headers + pax, dtype=np.int64) // BLOCK
    hdr = blocks[rows]
    stored = _octal_fields(hdr[:, _CHECKSUM_FIELD])
    if stored is None:
        return None
    total = hdr.sum(axis=1, dtype=np.int64) - hdr[:, _CHECKSUM_FIELD].sum(axis=1, dtype=np.int64) + 8 * 32
    if not np.array_equal(stored, total):
        return None
    real = hdr[: len(headers)]
    ustar = (real[:, 257:263] == np.frombuffer(b"ustar\0", dtype=np.uint8)).all(axis=1)
    if (real[ustar, 345:500] != 0).any():  # a ustar prefix: the name continues elsewhere
        return None
    name_bytes = real[:, :100]
    zero = name_bytes == 0
    if ((np.cumsum(zero, axis=1) > 0) & ~zero).any() or (name_bytes >= 128).any():
        return None  # bytes after the name's NUL, or a non-ASCII name
    names = name_bytes.copy().view("S100").ravel().tolist()
    joined = b"\n".join(names).decode("ascii") + "\n"
    if not _PLAIN_NAMES.fullmatch(joined):
        return None
    return PlainWalk(starts, headers, sizes, joined.split("\n")[:-1], end)


# ------------------------------------------------------------------------------------------------ writing


def octal_columns(values: np.ndarray, width: int) -> np.ndarray:
    """Each value as `width` octal digits (ASCII), zero-padded: numpy's version of `b"%0*o" % v`."""
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts[None, :]) & 7).astype(np.uint8) + 48


def plain_headers(template: bytes, names: list[bytes], sizes: np.ndarray) -> np.ndarray:
    """Headers for members with short ASCII names, from a template header (mode, owner, mtime, magic):
    name, `%011o\\0` size and `%06o\\0 ` checksum filled in, as tarfile writes them, for all at once."""
    n = len(names)
    hdr = np.empty((n, BLOCK), dtype=np.uint8)
    hdr[:] = np.frombuffer(template, dtype=np.uint8)
    hdr[:, :100] = np.array(names, dtype="S100").view(np.uint8).reshape(n, 100)
    hdr[:, 124:135] = octal_columns(sizes, 11)
    hdr[:, 135] = 0
    hdr[:, _CHECKSUM_FIELD] = 32
    total = hdr.sum(axis=1, dtype=np.int64)
    hdr[:, 148:154] = octal_columns(total, 6)
    hdr[:, 154] = 0
    return hdr
