"""Samples to a batch: stack what stacks (into a shared-memory slot in a worker; decoded images as a
channels_last batch), list the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from prep.errors import PrepError
from prep.loaders.io.shm import pooled_like, shared_empty


def empty_batch() -> dict[str, Any]:
    """The batch of no samples: a rank's slice of a short final batch, or a batch whose samples were all
    skipped as bad (per-rank batches of one make that every bad sample's)."""
    return {"__key__": []}


def default_collate_or_empty(samples: Sequence[Any]) -> Any:
    """torch's `default_collate`, which cannot collate an empty list, and `empty_batch()` for one."""
    return default_collate(list(samples)) if samples else empty_batch()


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (same-shape tensors and arrays, numbers), list the rest (str, bytes, dicts, PIL).

    An empty list gives `empty_batch()`."""
    if not samples:
        return empty_batch()
    out: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = stack_column(name, values)
    return out


def stack_column(name: str, values: list[Any]) -> Any:
    """One field's values of a batch, stacked if they stack, else the list."""
    first = values[0]
    if isinstance(first, torch.Tensor | np.ndarray) and all(
        type(v) is type(first) and v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        tensors = [torch.as_tensor(v) for v in values]
        if all(_hwc_view(t) for t in tensors):  # decoded images: stack the pixels as they lie
            hwc = [t.permute(1, 2, 0) for t in tensors]
            out = shared_empty((len(hwc), *hwc[0].shape), hwc[0].dtype)
            return pooled_like(torch.stack(hwc, out=out).permute(0, 3, 1, 2), out)
        out = shared_empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
        return torch.stack(tensors, out=out)
    if isinstance(first, torch.Tensor | np.ndarray):
        raise shape_error(name, [tuple(v.shape) for v in values])
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return torch.tensor(values)
    return values


def _hwc_view(t: torch.Tensor) -> bool:
    """A CxHxW view of HxWxC memory (what image decoding gives): stacked, it becomes a channels_last batch
    without a transpose copy."""
    return t.dim() == 3 and not t.is_contiguous() and t.permute(1, 2, 0).is_contiguous()


def shape_error(name: str, shapes: Sequence[tuple[int, ...]]) -> PrepError:
    """Values of one field that cannot be stacked into a batch because their shapes differ."""
    return PrepError(
        f"field {name!r} has different shapes in one batch: {sorted(set(shapes))[:4]}",
        "collate",
        "set image_size=... (resize + crop), use aspect-ratio buckets, or pass collate=",
    )
