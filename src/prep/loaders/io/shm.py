"""Shared-memory batch buffers ("slots") that workers reuse, so a batch reaches the main process
without a fresh segment per tensor."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from prep.loaders.io import torch_private

# A batch tensor made in a DataLoader worker reaches the main process through shared memory. torch's
# default is a fresh segment per tensor: every page is faulted in anew, and the segment's descriptor
# travels over a socket round trip (~2 ms) per tensor. Instead, each worker keeps a few segments
# ("slots"), sends a slot's descriptor once, and afterwards only its (slot, generation, layout); the
# main process marks a slot free again when the last tensor viewing it is garbage-collected. With no
# free slot (a trainer that holds on to many batches), a worker falls back to a fresh segment.
_HEADER = 64  # bytes at the start of a slot: int64 [state (1 = handed out), unused], keeps data aligned


_SLOTS_PER_WORKER = 6
_WORKER_SLOTS: _WorkerSlots | None = None
_fresh_shared = torch_private.new_shared
# main-process side: (token, slot) -> (whole slot as numpy, its state header); live handouts by generation
_MAIN_SLOTS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
_LIVE: dict[tuple[str, int], tuple[int, Any]] = {}
# the two maps above are shared by every DataLoader of the process (two ranks simulated in threads, a
# train and a validation loader), whose batches are rebuilt on their own threads
_SLOTS_LOCK = threading.RLock()


def _fresh_slots_lock() -> None:
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_fresh_slots_lock)
_NO_SUBCLASS_DISPATCH = torch_private.disabled_torch_function_impl()


class _PooledTensor(torch.Tensor):
    """A worker-side view of a slot; pickles as a slot reference. Operations on it give plain tensors.
    (Only made where `torch_private.slots_supported()`.)"""

    if _NO_SUBCLASS_DISPATCH is not None:
        __torch_function__ = _NO_SUBCLASS_DISPATCH
    _prep_slot: _Slot
    _prep_gen: int
    _prep_layout: tuple[Any, ...]


class _Slot:
    def __init__(self, nbytes: int) -> None:
        self.whole = _fresh_shared((_HEADER + nbytes,), torch.uint8)
        self.state = self.whole.numpy()[:16].view(np.int64)
        self.cap = nbytes
        self.index = 0
        self.gen = 0
        self.sent = False
        # the last image-batch views made of this slot: ((n, h, w), rows to decode into, batch tensor)
        self.rows: tuple[tuple[int, int, int], np.ndarray, _PooledTensor] | None = None


class _WorkerSlots:
    """One worker's slots. `token` is random per process, so a restarted worker's slots never alias.

    A slot is marked handed out when taken and freed by the main process when the last tensor viewing it
    dies there; a slot taken for a batch but not in what the worker sends (a float conversion, a map that
    returned new objects, an error) is freed by `release_unsent` when the request ends. `fresh` counts
    the fresh segments made because every slot was out."""

    def __init__(self) -> None:
        import os
        import secrets

        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.slots: list[_Slot] = []
        self.scope: list[_Slot] | None = None  # slots taken during the current request
        self.fresh = 0

    def take(self, nbytes: int) -> _Slot | None:
        """A free slot of at least `nbytes`, marked handed out; None when every slot is out."""
        free = [i for i, s in enumerate(self.slots) if s.state[0] == 0]
        fits = [i for i in free if self.slots[i].cap >= nbytes]
        if fits:
            i = fits[0]
        elif len(self.slots) < _SLOTS_PER_WORKER:
            self.slots.append(_Slot(_slot_size(nbytes)))
            i = len(self.slots) - 1
        elif free:  # a free slot too small for this shape: regrow it
            i = free[0]
            self.slots[i] = _Slot(_slot_size(nbytes))
        else:
            return None
        slot = self.slots[i]
        slot.index = i
        slot.state[0] = 1
        slot.gen += 1
        if self.scope is not None:
            self.scope.append(slot)
        return slot


def _slot_size(nbytes: int) -> int:
    """Room for `nbytes` rounded up to a power of two (at least 64 KiB), so batches that vary a little in
    size (raw bytes, short last batches) reuse a slot instead of regrowing it. Untouched shared-memory
    pages cost nothing."""
    return max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())


def _worker_slots() -> _WorkerSlots:
    global _WORKER_SLOTS
    if _WORKER_SLOTS is None:
        _WORKER_SLOTS = _WorkerSlots()
    return _WORKER_SLOTS


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; inside a DataLoader worker, in shared memory (a recycled slot when one is free),
    so passing it to the main process sends a reference, not the data."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    if not torch_private.slots_supported():
        return _fresh_shared(shape, dtype)
    n = math.prod(shape)
    slot = _take(n * dtype.itemsize)
    if slot is None:
        return _fresh_shared(shape, dtype)
    flat = slot.whole[_HEADER : _HEADER + n * dtype.itemsize].view(dtype)
    return _pooled(flat.view(tuple(shape)), slot)


def _take(nbytes: int) -> _Slot | None:
    """A free slot of this worker, or None (counted) when every slot is out."""
    slots = _worker_slots()
    slot = slots.take(nbytes)
    if slot is None:
        slots.fresh += 1
    return slot


def shared_rows(n: int, h: int, w: int) -> tuple[np.ndarray, torch.Tensor]:
    """An image batch to decode into: (n x h x w x 3 uint8 rows, the batch as an n x 3 x h x w
    channels_last view of them), like `shared_empty` followed by a permute. A worker's slot keeps the
    views it last made, and a batch of the same shape reuses them: in a worker each torch call costs
    ~10 us among the decodes that sweep the caches, and this takes a batch's five to none."""
    if torch.utils.data.get_worker_info() is None or not torch_private.slots_supported():
        t = shared_empty((n, h, w, 3), torch.uint8)
        return t.numpy(), pooled_like(t.permute(0, 3, 1, 2), t)
    slot = _take(n * h * w * 3)
    if slot is None:
        t = _fresh_shared((n, h, w, 3), torch.uint8)
        return t.numpy(), t.permute(0, 3, 1, 2)
    made = slot.rows
    if made is None or made[0] != (n, h, w):
        rows = slot.whole[_HEADER : _HEADER + n * h * w * 3].view(n, h, w, 3)
        view = rows.permute(0, 3, 1, 2)
        batch = _pooled(view, slot)
        batch._prep_layout = _layout(view)
        made = slot.rows = (n, h, w), rows.numpy(), batch
    _, arr, batch = made
    batch._prep_gen = slot.gen  # this handout's: the same memory, handed out anew
    return arr, batch


def _pooled(t: torch.Tensor, slot: _Slot) -> _PooledTensor:
    out = t.as_subclass(_PooledTensor)
    out._prep_slot, out._prep_gen = slot, slot.gen
    return out


def pooled_like(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`t` (a view of `base`) keeps travelling as a slot reference when `base` is a slot view."""
    return _pooled(t, base._prep_slot) if isinstance(base, _PooledTensor) else t


class SlotBytes(list[bytes]):
    """A worker's list of byte strings that are slices of a slot: it pickles as (slot, spans), so the
    bytes cross to the main process through shared memory instead of being pickled into the result pipe.
    A list that was changed after it was made pickles as a plain list."""

    __slots__ = ("_buf", "_items", "_spans")
    _buf: torch.Tensor
    _items: tuple[bytes, ...]
    _spans: list[int]

    def __reduce_ex__(self, protocol: Any):
        if len(self) == len(self._items) and all(a is b for a, b in zip(self, self._items, strict=True)):
            return _bytes_from_slot, (self._buf, self._spans)
        return list, (list(self),)


def bytes_list(buf: torch.Tensor, items: list[bytes], spans: list[int]) -> list[bytes]:
    """`items`, the slices [spans[2k], spans[2k+1]) of the uint8 tensor `buf`, as a list that travels as
    a slot reference when `buf` is a slot (else `items` itself)."""
    if not isinstance(buf, _PooledTensor):
        return items
    out = SlotBytes(items)
    out._buf, out._spans, out._items = buf, spans, tuple(items)
    return out


def _bytes_from_slot(buf: torch.Tensor, spans: list[int]) -> list[bytes]:
    mv = buf.numpy().data
    return [mv[spans[k] : spans[k + 1]].tobytes() for k in range(0, len(spans), 2)]


def _layout(plain: torch.Tensor) -> tuple[Any, ...]:
    """(byte offset in its storage, shape, stride, dtype): how `_rebuild_pooled` views a slot."""
    return plain.storage_offset() * plain.element_size(), tuple(plain.shape), plain.stride(), plain.dtype


def _reduce_pooled(t: _PooledTensor):
    slot = t._prep_slot
    layout = _slot_layout(t, slot)
    if layout is None:  # not (or no longer) a view of its slot: torch's own way
        reduce_tensor = torch_private.tensor_reducer()
        if reduce_tensor is None:
            raise RuntimeError("a slot view exists without torch's tensor reducer")  # made only where it is
        return reduce_tensor(t.as_subclass(torch.Tensor))
    return _slot_reference(slot, layout)


def _reduce_plain(torch_reduce: Callable[[torch.Tensor], Any], t: torch.Tensor):
    """A plain tensor crossing processes: a view of a slot this worker has handed out (a permute or slice
    of a batch tensor, which operations on a slot view return as plain tensors) travels as a slot
    reference like the view itself. Sent by `torch_reduce` (torch's reducer), it would map the slot's
    memory again in the main process, where the slot's release does not see it: the slot was reused
    under it, or, when it was the only view sent, never freed. Anything else goes to `torch_reduce`."""
    slot = _handed_out_slot(t)
    if slot is None:
        return torch_reduce(t)
    return _slot_reference(slot, _layout(t))


def _handed_out_slot(t: torch.Tensor) -> _Slot | None:
    if _WORKER_SLOTS is None or t.device.type != "cpu":
        return None
    ptr = t.untyped_storage().data_ptr()
    for slot in _WORKER_SLOTS.slots:
        if slot.state[0] == 1 and slot.whole.untyped_storage().data_ptr() == ptr:
            return slot
    return None


def _slot_reference(slot: _Slot, layout: tuple[Any, ...]):
    """What a tensor viewing `slot` pickles as: the slot's segment the first time it is sent, then only
    (slot, generation, layout)."""
    assert _WORKER_SLOTS is not None  # slots exist only in a worker
    storage = None if slot.sent else slot.whole.untyped_storage()
    slot.sent = True
    return _rebuild_pooled, (_WORKER_SLOTS.token, slot.index, slot.gen, storage, layout)


def _slot_layout(t: _PooledTensor, slot: _Slot) -> tuple[Any, ...] | None:
    """t's layout in its slot for this handout, or None where it is not one (not in a worker, an older
    handout, a tensor that no longer views the slot). A view `shared_rows` made carries its layout."""
    if _WORKER_SLOTS is None or t._prep_gen != slot.gen:
        return None
    layout = getattr(t, "_prep_layout", None)
    if layout is not None:
        return layout
    plain = t.as_subclass(torch.Tensor)
    if plain.untyped_storage().data_ptr() != slot.whole.untyped_storage().data_ptr():
        return None
    return _layout(plain)


def _release(state: np.ndarray, _dead: Any) -> None:
    """The callback of a handout's weak reference: its ndarray died, so the worker may reuse the slot."""
    state[0] = 0


def _rebuild_pooled(token: str, i: int, gen: int, storage: Any, layout: tuple[Any, ...]) -> torch.Tensor:
    key = (token, i)
    with _SLOTS_LOCK:
        if storage is not None:
            if not any(k[0] == token for k in _MAIN_SLOTS):
                _forget_dead_workers()
            whole = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            _MAIN_SLOTS[key] = whole, whole[:16].view(np.int64)
        whole, state = _MAIN_SLOTS[key]
        live = _LIVE.get(key)
        base = live[1]() if live is not None and live[0] == gen else None
        if base is None:  # one ndarray per handout: when the last tensor viewing it dies, the slot is free
            base = whole[_HEADER:]
            # a weak reference with a callback, not `weakref.finalize` (a Python object and registry entry
            # per batch): the slot is handed out again only after this fires, so `_LIVE` still holds it
            _LIVE[key] = gen, weakref.ref(base, functools.partial(_release, state))
    offset, shape, stride, dtype = layout
    flat = torch.from_numpy(base)
    itemsize = dtype.itemsize
    if dtype != torch.uint8:  # the slot's bytes as this dtype
        flat = flat[: flat.numel() // itemsize * itemsize].view(dtype)
    return flat.as_strided(shape, stride, (offset - _HEADER) // itemsize)


def _forget_dead_workers() -> None:
    """Drop the slots of workers that have exited (tensors still viewing them keep their memory). Called
    with `_SLOTS_LOCK` held."""
    for token in {k[0] for k in _MAIN_SLOTS}:
        try:
            os.kill(int(token.split("-")[0]), 0)
        except ProcessLookupError:
            for k in [k for k in _MAIN_SLOTS if k[0] == token]:
                del _MAIN_SLOTS[k]
                _LIVE.pop(k, None)
        except (PermissionError, ValueError):
            pass


@contextmanager
def slot_scope() -> Iterator[Callable[[Any], None]]:
    """Around one worker request: yields `sent(result)`, to call with what the request returns. Slots
    taken during the request that the result does not carry are freed then (they would otherwise stay
    handed out forever: nothing in the main process will ever free them); on an error, all of them."""
    if torch.utils.data.get_worker_info() is None:
        yield lambda result: None
        return
    slots = _worker_slots()
    outer, slots.scope = slots.scope, []
    taken = slots.scope
    result: list[Any] = []
    try:
        yield result.append
    finally:
        slots.scope = outer
        keep = _slots_in(result[0], taken) if result else set()
        for slot in taken:
            if id(slot) not in keep:
                slot.state[0] = 0
        if outer is not None:
            outer += [s for s in taken if id(s) in keep]


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))


_MAX_DEPTH = 16


def _slots_in(obj: Any, taken: Sequence[_Slot]) -> set[int]:
    """ids of the taken slots whose memory `obj` may carry to the main process: tensors and arrays that
    view a slot, slot byte lists that pickle as a reference. Anything it cannot see into (an object of
    another type) keeps every slot: a slot freed while its memory is still on its way would be reused.
    Breadth first, and done as soon as every taken slot is found: a batch's image tensor sits near the
    top, its captions and metadata (many small objects) below it."""
    if not taken:
        return set()
    ranges = [(_storage_ptr(s.whole), _storage_ptr(s.whole) + _HEADER + s.cap, id(s)) for s in taken]
    everything = {id(s) for s in taken}
    found: set[int] = set()
    level = [obj]
    for depth in range(_MAX_DEPTH + 2):
        below: list[Any] = []
        for x in level:
            if isinstance(x, _SCALARS):
                continue
            if depth > _MAX_DEPTH:
                return everything
            if isinstance(x, SlotBytes):
                if x.__reduce_ex__(2)[0] is not _bytes_from_slot:
                    continue  # it pickles as a list of bytes copies
                ptr = _storage_ptr(x._buf)
            elif isinstance(x, torch.Tensor):
                ptr = _storage_ptr(x)
            elif isinstance(x, np.ndarray):
                if x.dtype.hasobject:
                    return everything
                ptr = x.__array_interface__["data"][0]
            else:
                if isinstance(x, Mapping):
                    below += x.keys()
                    below += x.values()
                elif isinstance(x, list | tuple | set | frozenset):
                    below += x
                elif dataclasses.is_dataclass(x) and not isinstance(x, type):
                    below += [getattr(x, f.name) for f in dataclasses.fields(x)]
                elif not _is_pil_image(x):  # PIL images pickle their pixels as bytes
                    return everything
                continue
            found.update(i for lo, hi, i in ranges if lo <= ptr < hi)
            if len(found) == len(everything):
                return found
        if not below:
            break
        level = below
    return found


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type == "cpu" else -1


def _is_pil_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _register_reducer() -> None:
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(_PooledTensor, _reduce_pooled)
    torch_reduce = ForkingPickler._extra_reducers.get(torch.Tensor)  # type: ignore[attr-defined]
    if torch_reduce is not None:  # torch's, registered when torch was imported: slot views go around it
        ForkingPickler.register(torch.Tensor, functools.partial(_reduce_plain, torch_reduce))


_register_reducer()
