"""Every private torch API the loaders use, in one place, each with a fallback for a torch without it.

prep supports `torch>=2.1`; these attributes are not part of torch's public API and may move. Each
lookup happens when it is used (not at import), returns a fallback or None when the attribute is
missing, and the callers degrade to torch's public behaviour: batches still arrive, only slower.

- `torch._C._disabled_torch_function_impl`: makes operations on a slot-view tensor subclass return
  plain tensors. Without it, shared-memory slots are not used (a fresh segment per batch tensor).
- `torch.multiprocessing.reductions.reduce_tensor`: torch's own pickling of a shared tensor, for a slot
  view that no longer is one. Without it, slots are not used either.
- `TypedStorage._new_shared`: a shared-memory storage without first filling a private one. Without it,
  `share_memory_()` (public) makes the same segment with one extra copy.
- `_worker_result_queue._reader` of torch's multiprocessing DataLoader iterator: the result pipe, to
  enlarge it. Without it the pipe keeps its default size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def disabled_torch_function_impl() -> Any | None:
    """torch's `__torch_function__` that skips subclass dispatch, or None."""
    return getattr(torch._C, "_disabled_torch_function_impl", None)


def tensor_reducer() -> Callable[[torch.Tensor], Any] | None:
    """torch's pickling reducer for tensors crossing processes, or None."""
    try:
        from torch.multiprocessing import reductions
    except ImportError:  # pragma: no cover - torch builds without multiprocessing support
        return None
    return getattr(reductions, "reduce_tensor", None)


def slots_supported() -> bool:
    """Whether recycled shared-memory slots can work with this torch."""
    return disabled_torch_function_impl() is not None and tensor_reducer() is not None


def new_shared(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in a fresh shared-memory segment."""
    proto = torch.empty(0, dtype=dtype)
    typed = getattr(proto, "_typed_storage", None)
    new_storage = getattr(typed(), "_new_shared", None) if typed is not None else None
    if new_storage is None:
        return torch.empty(tuple(shape), dtype=dtype).share_memory_()
    return proto.new(new_storage(math.prod(shape), device="cpu")).resize_(tuple(shape))


def result_pipe_reader(batches: Any) -> Any | None:
    """The read end of a multiprocessing DataLoader iterator's result pipe, or None."""
    return getattr(getattr(batches, "_worker_result_queue", None), "_reader", None)
