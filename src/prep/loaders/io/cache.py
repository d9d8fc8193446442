"""`ShardCache`: a bounded on-disk cache of whole remote (and `pipe:`) shards, shared by every worker
and rank of a node.

Why: one ranged request per sample pays the store's latency per sample and meets its rate limits; a
whole shard is one stream at the link's bandwidth, after which every sample is a local `pread`.

Layout: one flat folder. An entry is `<hash>.shard`, the shard's bytes up to the end of its last sample,
or `<hash>.idx`, the shard's sample offsets (so a node fetches a remote `.idx` once, not once per worker
and per epoch); the hash is of the shard's redacted URL (no user info, no query string: no token ever
reaches a file name) or of its whole `pipe:` command, with its size and checksum, so a changed shard is
a new entry. An entry only ever appears by rename of a complete temp (`formats.atomic.temp_name`), so a
reader killed mid-download leaves a temp, never a short entry; the next fill sweeps temps of dead writers.

Locks (`fcntl.flock`, so processes of one node agree, and a killed holder releases):
- `.slot-XX.lock` (256 of them, XX from the entry's hash): one download per entry; a second reader waits
  and then reads the finished entry (read-ahead does not wait: it goes on to the next shard, so two
  workers download two shards at once). Slots, not a lock file per entry: creating a file is the
  costliest step of a fill on ext4 with many recently deleted inodes (0.6 ms each, 5% of a cold epoch's
  CPU in `bench/remote_cache.py`); two entries sharing a slot merely take turns;
- `.cache.lock`: accounting. The byte limit covers entries and temps; a temp is created at its full
  size when it is reserved, so the sum of file sizes never exceeds `max_bytes`. The lock file holds a
  ledger of the bytes in use (see `_reserve`). Room is made by deleting least recently used entries
  (mtime, touched on every open) that no reader holds;
- readers hold a shared lock on each entry they read, so eviction skips entries in use. When no room can
  be made, `fill` returns None and the caller reads the shard without the cache (ranged reads).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prep.errors import PrepError
from prep.formats.atomic import dead_writer, temp_name

ENTRY_SUFFIX = ".shard"
INDEX_SUFFIX = ".idx"
_ENTRY_SUFFIXES = (ENTRY_SUFFIX, INDEX_SUFFIX)
_LOCK_NAME = ".cache.lock"
_TOUCH_SECONDS = 1.0


def entry_name(identity: str, size: int, checksum: str | None, suffix: str = ENTRY_SUFFIX) -> str:
    """The file name of a shard's entry (`suffix` ENTRY_SUFFIX) or of its offsets (INDEX_SUFFIX): a hash
    of where it comes from (redacted by the caller), its size and checksum. Nothing of the URL is
    readable in it."""
    text = json.dumps([identity, int(size), checksum or "", suffix])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest() + suffix


# Descriptors this process holds on cache files. A flock belongs to the open file, which a fork shares:
# a DataLoader forking its workers while a thread holds a lock would leave the lock held by children that
# never release it. So a child closes its copies at once (the parent's close then releases the lock). A
# fork waits for `_FD_LOCK`, so no descriptor is ever open but not yet listed (or unlisted but not yet
# closed) at the moment of a fork: such a one would escape the child's sweep and hold its lock for the
# child's life, stalling every other reader of the node (seen with a thread polling the cache while
# DataLoaders started their workers).
_HELD: set[int] = set()
_FD_LOCK = threading.Lock()


def _open(path: Path, flags: int) -> int:
    with _FD_LOCK:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        _HELD.add(fd)
    return fd


def release(fd: int) -> None:
    """Close a descriptor from `ShardCache.open` (its shared lock goes with it)."""
    with _FD_LOCK:
        _HELD.discard(fd)
        os.close(fd)


def _close_inherited() -> None:
    global _FD_LOCK
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _FD_LOCK = threading.Lock()  # the parent's was held across the fork (see `before` below)


os.register_at_fork(before=lambda: _FD_LOCK.acquire(), after_in_parent=lambda: _FD_LOCK.release(),
                    after_in_child=_close_inherited)


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = _open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        release(fd)  # closing releases the lock


class ShardCache:
    """A cache folder with a byte limit. Holds no open state, so it pickles to workers as two values."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise PrepError(f"cache_bytes={max_bytes!r} is not a positive number of bytes", "cache_bytes",
                            "pass the most disk the shard cache may use, e.g. 50 * 2**30")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrepError(f"cannot create the cache folder ({err.strerror})", str(self.folder),
                            "pass a writable cache_dir") from None

    def __repr__(self) -> str:
        return f"ShardCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------------------------ reading
    def open(self, name: str) -> int | None:
        """A read-only descriptor of a complete entry, with a shared lock held until it is closed (so it
        is not evicted while read), its mtime touched (LRU); None when it is not cached."""
        path = self.folder / name
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = os.fstat(fd)
        if st.st_nlink == 0:  # evicted between open and lock: gone
            release(fd)
            return None
        if time.time() - st.st_mtime > _TOUCH_SECONDS:  # LRU order to the second: one write per second
            with contextlib.suppress(OSError):
                os.utime(path)
        return fd

    def fill(self, name: str, size: int, write: Callable[[int], int], *, wait: bool = True) -> int | None:
        """`open(name)`, downloading the entry first when absent: `write(fd)` writes bytes [0, size) into a
        reserved temp (positioned writes, in any order) and returns how many it wrote; the temp is renamed
        into place when complete. None when the byte limit leaves no room (every other entry in use, or
        one shard larger than the limit): the caller reads around the cache. With `wait=False` (read-ahead)
        an entry another process is downloading is not waited for: None at once."""
        fd = self.open(name)
        if fd is not None:
            return fd
        with self._slot(name, wait) as mine:
            if not mine:
                return None
            fd = self.open(name)  # another process finished it while this one waited
            if fd is None and self._store(name, size, write):
                fd = self.open(name)
        return fd

    def fetch_small(self, name: str, fetch: Callable[[], bytes | None]) -> bytes | None:
        """The bytes of a small entry (a shard's offsets): read from the cache, else `fetch()`ed (once per
        node: other processes wait for it) and kept when there is room. None when `fetch` finds nothing."""
        got = self._read_whole(name)
        if got is not None:
            return got
        with self._slot(name, True):
            got = self._read_whole(name)
            if got is None:
                got = fetch()
                if got is not None:
                    data = got
                    self._store(name, len(data), lambda out: os.pwrite(out, data, 0))
        return got

    def _read_whole(self, name: str) -> bytes | None:
        fd = self.open(name)
        if fd is None:
            return None
        try:
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            release(fd)

    @contextlib.contextmanager
    def _slot(self, name: str, wait: bool) -> Iterator[bool]:
        """Hold the download lock of `name`'s slot (yields False when `wait` is off and it is taken)."""
        lock = _open(self.folder / f".slot-{name[:2]}.lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            release(lock)  # closing releases the lock

    def _store(self, name: str, size: int, write: Callable[[int], int]) -> bool:
        """Write a new entry through a reserved temp and rename it into place (the slot lock is held);
        False when the byte limit leaves no room."""
        tmp = self._reserve(name, size)
        if tmp is None:
            return False
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            try:
                got = write(out)
            finally:
                os.close(out)
            if got != size:
                raise PrepError(f"the download wrote {got} bytes, the shard's samples end at byte {size}",
                                name, "check that the shard did not change since it was listed")
            with _flock(self.folder / _LOCK_NAME):  # names change only under the lock: see `_files`
                os.replace(tmp, self.folder / name)
        except BaseException:
            self._unreserve(tmp, size)
            raise
        return True

    # --------------------------------------------------------------------------------- accounting
    def used_bytes(self) -> int:
        """Bytes of entries and reserved temps (what the limit bounds), read under the accounting lock so
        no reservation or eviction is half seen."""
        with _flock(self.folder / _LOCK_NAME):
            return sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[Path, int, float]]:
        """The folder's entries and temps with size and mtime. Called under the accounting lock, and every
        name in the folder is created, renamed or deleted only under it: a listing that ran beside a
        rename could count the file twice or not at all (directory order is by name hash)."""
        out = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _reserve(self, name: str, size: int) -> Path | None:
        """A temp of `size` bytes for entry `name`, made under the accounting lock once there is room;
        None when LRU eviction cannot make it.

        The lock file holds a ledger of the bytes in use, so a reservation with room to spare costs two
        small reads and writes, not a listing of the folder (2.3 ms a fill with 256 entries, a third of a
        download's CPU). The ledger never counts less than the folder holds (it grows before a temp is
        made, shrinks after a file is deleted); what it counts too much (a killed writer's temp, a file
        deleted by hand) is corrected by the full listing that runs whenever it reports no room, and at a
        process's first reservation."""
        if size > self.max_bytes:
            return None
        with _flock(self.folder / _LOCK_NAME) as fd:
            used = _ledger(fd)
            first = (str(self.folder), os.getpid()) not in _LISTED
            if used is None or used + size > self.max_bytes or first:
                used = self._make_room(size)  # and, once per process, sweep what killed writers left
                _LISTED.add((str(self.folder), os.getpid()))
            if used + size > self.max_bytes:
                _set_ledger(fd, used)
                return None
            _set_ledger(fd, used + size)  # counted before the temp exists: never less than the truth
            tmp = temp_name(self.folder / name)
            with open(tmp, "wb") as f:
                f.truncate(size)
            return tmp

    def _unreserve(self, tmp: Path, size: int) -> None:
        """Delete a failed download's temp and give its reservation back."""
        with _flock(self.folder / _LOCK_NAME) as fd:
            tmp.unlink(missing_ok=True)
            used = _ledger(fd)
            if used is not None:
                _set_ledger(fd, max(0, used - size))

    def _make_room(self, size: int) -> int:
        """List the folder (the accounting lock is held): delete dead writers' temps, then least recently
        used entries no reader holds until `size` more bytes fit; return the bytes then in use."""
        now = time.time()
        files = []
        for path, fsize, mtime in self._files():
            if not path.name.endswith(_ENTRY_SUFFIXES) and dead_writer(path.name, mtime, now):
                path.unlink(missing_ok=True)  # a killed reader's download
                continue
            files.append((path, fsize, mtime))
        used = sum(f[1] for f in files)
        for path, fsize, _ in sorted((f for f in files if f[0].name.endswith(_ENTRY_SUFFIXES)),
                                     key=lambda f: f[2]):
            if used + size <= self.max_bytes:
                break
            if _evict(path):
                used -= fsize
        return used


# (folder, pid) pairs whose first reservation listed the folder: a process's first fill sweeps the temps of
# killed writers, whatever the ledger says
_LISTED: set[tuple[str, int]] = set()


def _ledger(fd: int) -> int | None:
    raw = os.pread(fd, 8, 0)
    return int.from_bytes(raw, "little") if len(raw) == 8 else None


def _set_ledger(fd: int, used: int) -> None:
    os.pwrite(fd, used.to_bytes(8, "little"), 0)


def _evict(path: Path) -> bool:
    """Delete an entry no reader holds (an exclusive lock is refused while any shared one is held)."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        release(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    try:
        path.unlink(missing_ok=True)
        return True
    finally:
        release(fd)
