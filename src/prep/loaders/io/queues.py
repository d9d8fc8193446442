"""Worker queues that write in the caller's thread when the write cannot block.

torch's DataLoader talks to its workers through `multiprocessing.Queue`s, whose `put` hands each object
to a feeder thread that pickles and writes it. For a few kilobytes (a request; a batch that travels as
references to shared memory) the thread's wake-up costs more than the write, and in the training
process the thread takes the GIL from the training loop for every request.

`CallerWritesQueue.put` pickles (`dumps`: `ForkingPickler`'s reducers without its per-call table copy)
and writes at once when the pipe has room for the whole message. It checks the room under the queue's
write lock, so the write never blocks: a worker stuck on a full pipe would hold up its own shutdown. A
message without room, or whose lock another writer holds while blocked on the pipe, goes to the
feeder thread as the bytes already pickled, and every later message of that process goes to the thread
as before: nothing then overtakes what the thread holds. Where the room cannot be told (not Linux),
every message goes to the feeder thread.
"""

from __future__ import annotations

import copyreg
import io
import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.queues as mp_queues
import pickle
import queue
import struct
from multiprocessing.reduction import ForkingPickler
from typing import Any

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX: the feeder thread writes everything
    fcntl = None  # type: ignore[assignment]

_GET_PIPE_SIZE: int | None = getattr(fcntl, "F_GETPIPE_SZ", None)  # Linux only: elsewhere, the feeder

_LOCK_WAIT = 0.05  # seconds: longer than any write that does not block
_SLACK = 2 * 4096 + 16  # partly read pages hold a slot of the pipe each; send_bytes adds a length header


class _Reducers:
    """`ForkingPickler`'s reducers (torch's for tensors and storages among them) over copyreg's, looked
    up when an object needs one. `ForkingPickler.dumps` copies both tables into a new dict for every
    message instead: 60-80 us a call once torch has registered its 78, several times what pickling a
    request itself costs."""

    __slots__ = ()

    def __getitem__(self, cls: type) -> Any:
        reduce = ForkingPickler._extra_reducers.get(cls)  # type: ignore[attr-defined]
        return copyreg.dispatch_table[cls] if reduce is None else reduce


class _Pickler(pickle.Pickler):
    dispatch_table = _Reducers()  # type: ignore[assignment]


def dumps(obj: Any) -> memoryview:
    """`ForkingPickler.dumps(obj)`: the same reducers, the same protocol, without its per-call copy."""
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getbuffer()


def pipe_room(fd: int) -> int | None:
    """Bytes a write to this pipe takes without blocking, or None where that cannot be told."""
    if _GET_PIPE_SIZE is None:  # pragma: no cover - not Linux
        return None
    try:
        size = fcntl.fcntl(fd, _GET_PIPE_SIZE)
        unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:  # not a pipe
        return None
    return size - unread - _SLACK


class CallerWritesQueue(mp_queues.Queue):
    """A `multiprocessing.Queue` whose `put` writes in the calling thread while the pipe has room.

    Each process's messages arrive in the order it put them, whichever way each one went."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        lock = self._wlock  # type: ignore[attr-defined]  # None on Windows
        # the feeder thread where it took over in this process, or where the room cannot be told
        if self._thread is not None or lock is None or _GET_PIPE_SIZE is None:  # type: ignore[attr-defined]
            super().put(obj, block, timeout)
            return
        if self._closed:  # type: ignore[attr-defined]
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):  # type: ignore[attr-defined]  # get() releases it
            raise queue.Full
        data = dumps(obj)
        # A writer holds the lock for microseconds, unless it is blocked on a full pipe: then this one
        # would block behind it, so it leaves the message to its feeder thread instead.
        if lock.acquire(True, _LOCK_WAIT):
            try:
                room = pipe_room(self._writer.fileno())  # type: ignore[attr-defined]
                if room is not None and len(data) <= room:
                    self._send_bytes(data)  # type: ignore[attr-defined]
                    return
            finally:
                lock.release()
        self._sem.release()  # type: ignore[attr-defined]  # super().put takes it again
        # what was pickled is what travels: pickling has effects (a slot's segment goes with its first
        # message only, torch registers a tensor's descriptor to send), so the feeder must not pickle
        # `obj` anew
        super().put(_Pickled(data), block, timeout)


class _Pickled:
    """A message pickled already: the feeder thread pickles it as a call that unpickles those bytes, so
    the reader gets the original object."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (bytes(self.data),)


def caller_writes_context(context: str | mp_context.BaseContext | None) -> mp_context.BaseContext:
    """The multiprocessing context to give torch's DataLoader: `context` (a start method's name, a
    context, or None for the default one), whose `Queue()` makes `CallerWritesQueue`s. A context with a
    `Queue` of its own, or whose class cannot be subclassed without arguments, is returned as it is."""
    if context is None or isinstance(context, str):
        context = multiprocessing.get_context(context)
    base = type(context)
    if base.Queue is not mp_context.BaseContext.Queue or not _has_internals(context):
        return context
    try:
        return _subclass(base)()
    except TypeError:
        return context


_INTERNALS = ("_thread", "_closed", "_sem", "_wlock", "_writer", "_send_bytes")
_INTERNALS_FOUND: list[bool] = []


def _has_internals(context: mp_context.BaseContext) -> bool:
    """Whether this Python's `multiprocessing.Queue` has the private parts `put` uses (checked once, on a
    real queue); without them, torch's queues are used as they are."""
    if not _INTERNALS_FOUND:
        probe: mp_queues.Queue[Any] = mp_queues.Queue(ctx=context)
        _INTERNALS_FOUND.append(all(hasattr(probe, name) for name in _INTERNALS))
        probe.close()
    return _INTERNALS_FOUND[0]


_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    """One subclass per context class, made once."""
    sub = _SUBCLASSES.get(base)
    if sub is None:
        sub = _SUBCLASSES[base] = type(f"CallerWrites{base.__name__}", (base,), {"Queue": _queue})
    return sub


def _queue(self: mp_context.BaseContext, maxsize: int = 0) -> CallerWritesQueue:
    return CallerWritesQueue(maxsize, ctx=self.get_context())
