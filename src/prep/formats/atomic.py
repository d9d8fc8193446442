"""Atomic file writes: a temp name in the same folder, fsync, then rename over the final name."""

from __future__ import annotations

import ctypes
import os
import secrets
import sys
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` atomically. A file that already holds exactly `data` is left alone, so a
    re-run that computes the same result touches nothing (mtimes stay, rsync and make see no change)."""
    final = Path(path)
    if _holds(final, data):
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _holds(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def temp_name(final: Path) -> Path:
    """The temp sibling a writer renames over `final`: hidden, and unique per writer even across the
    nodes of a Slurm array on shared storage (where two writers may share a pid)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temps(path: str | os.PathLike[str]) -> int:
    """Delete temp files a killed writer left beside `path`. Only for a caller that owns `path` alone
    (a task owns its outputs), since a live writer's temp looks the same. Returns how many went."""
    final = Path(path)
    removed = 0
    for tmp in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc (Python's os module does not offer it), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a just-written range to disk without waiting, so the fsync that ends the file waits
    only for its last blocks. sync_file_range keeps the pages cached (as `cat` leaves them); where it is
    missing, POSIX_FADV_DONTNEED starts the same writeback (and drops the pages once clean)."""
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0:
        return
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
