"""Worker queues whose owning process writes in its own thread.

torch's DataLoader sends each request to a worker through a `multiprocessing.Queue`, whose `put` hands
the object to a feeder thread that pickles and writes it. In the training process that thread wakes for
every request and takes the GIL from the training loop to pickle a few hundred bytes: on the 2-core
benchmark machine, 2.4-3.5 us of the main process's CPU per sample (about a third of all it spends on
loading; `docs/loaders.md`). `CallerWritesQueue.put` in the process that created the queue pickles and
writes at once instead. Any other process (a worker sending its results) keeps the feeder thread, so a
worker never blocks on a full pipe while the training process shuts it down.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.queues as mp_queues
import os
import queue
from multiprocessing.reduction import ForkingPickler
from typing import Any


class CallerWritesQueue(mp_queues.Queue):
    """A `multiprocessing.Queue` whose creator's `put` writes to the pipe in the calling thread.

    Messages from the creator arrive in the order they were put. The creator keeps the pipe's read end
    open (as every `multiprocessing.Queue` does), so a write never fails because the reader died; it can
    block only when 64 KiB of messages are unread, which a DataLoader's few outstanding requests (a few
    hundred bytes each) never reach."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        if self._opid != os.getpid():  # type: ignore[attr-defined]  # another process: the feeder thread
            super().put(obj, block, timeout)
            return
        if self._closed:  # type: ignore[attr-defined]
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):  # type: ignore[attr-defined]  # get() releases it
            raise queue.Full
        data = ForkingPickler.dumps(obj)
        if self._wlock is None:  # type: ignore[attr-defined]  # Windows: one writer per pipe end
            self._send_bytes(data)  # type: ignore[attr-defined]
        else:
            with self._wlock:  # type: ignore[attr-defined]
                self._send_bytes(data)  # type: ignore[attr-defined]


def caller_writes_context(context: str | mp_context.BaseContext | None) -> mp_context.BaseContext:
    """The multiprocessing context to give torch's DataLoader: `context` (a start method's name, a
    context, or None for the default one), whose `Queue()` makes `CallerWritesQueue`s. A context class
    that cannot be subclassed without arguments is returned as it is."""
    if context is None or isinstance(context, str):
        context = multiprocessing.get_context(context)
    base = type(context)
    if base.Queue is not mp_context.BaseContext.Queue:
        return context  # a context with a Queue of its own: kept
    try:
        return _subclass(base)()
    except TypeError:
        return context


_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    """One subclass per context class, made once."""
    sub = _SUBCLASSES.get(base)
    if sub is None:
        sub = _SUBCLASSES[base] = type(f"CallerWrites{base.__name__}", (base,), {"Queue": _queue})
    return sub


def _queue(self: mp_context.BaseContext, maxsize: int = 0) -> CallerWritesQueue:
    return CallerWritesQueue(maxsize, ctx=self.get_context())
