"""Atomic file writes: a temp name in the same folder, fsync, then rename over the final name."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import secrets
import socket
import sys
import time
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
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write names no file: say which one (a full disk, a quota)
            raise OSError(err.errno, err.strerror, str(final)) from err
        raise
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


STALE_TEMP_SECONDS = 24 * 3600  # a temp of another machine untouched this long has no live writer
_TEMP_RE = re.compile(r"\..+\.tmp-(?P<owner>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}")


@functools.cache
def _owner() -> str:
    """This machine and pid namespace, hashed to 8 hex digits: where a temp's pid can be checked."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    return hashlib.blake2s(f"{socket.gethostname()}\0{pid_ns}".encode(), digest_size=4).hexdigest()


def temp_name(final: Path) -> Path:
    """The temp sibling a writer renames over `final`: hidden, unique per writer even across the nodes of
    a Slurm array on shared storage, and naming its owner (machine hash, pid) so a sweep can tell a
    killed writer's temp from a live one's."""
    return final.with_name(f".{final.name}.tmp-{_owner()}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temps(path: str | os.PathLike[str]) -> int:
    """Delete temp files a killed writer left beside `path`. Only for a caller that owns `path` alone
    (a task owns its outputs), since a live writer's temp looks the same. Returns how many went."""
    final = Path(path)
    removed = 0
    for tmp in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie does not: it was killed, not reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def dead_writer(name: str, mtime: float, now: float) -> bool:
    """Whether the temp file `name` (temp_name's form) belongs to no live writer: made on this machine by a
    process that is gone, or made elsewhere (another Slurm node) and untouched for STALE_TEMP_SECONDS.
    Any other name is not prep's temp and is never judged dead."""
    m = _TEMP_RE.fullmatch(name)
    if m is None:
        return False
    if m["owner"] == _owner():
        return not _alive(int(m["pid"]))
    return now - mtime > STALE_TEMP_SECONDS


def remove_dead_temps(path: str | os.PathLike[str]) -> int:
    """Delete the temps of dead writers (`dead_writer`) anywhere under folder `path`, or beside file
    `path`; a live writer's temp (another slice at work) stays. Returns how many went."""
    root = Path(path)
    if root.is_dir():
        found = (Path(d) / n for d, _, names in os.walk(root) for n in names)
    else:
        found = root.parent.glob(f".{glob_escape(root.name)}.tmp-*")
    now = time.time()
    removed = 0
    for tmp in found:
        try:
            if dead_writer(tmp.name, tmp.lstat().st_mtime, now):
                tmp.unlink()
                removed += 1
        except OSError:
            continue  # renamed into place or removed meanwhile, or not ours to remove
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
