"""How encodings are stored: `.npy` members (np.save, never pickle), and what to do about bfloat16.

numpy has no bfloat16. `store_dtype: auto` stores bfloat16 compute results as float32, which holds
every bfloat16 value exactly. `store_dtype: bfloat16` halves the bytes by storing the raw bit
patterns as uint16; the manifest then says `"dtype": "bfloat16", "storage": "uint16-bits"`, and
`load_npy(data, "bfloat16")` (or `torch.from_numpy(a).view(torch.bfloat16)`) gives the values back.
"""

from __future__ import annotations

import io

import numpy as np

from prep.formats.manifest import BF16_STORAGE


def npy_bytes(arr: np.ndarray) -> bytes:
    """One array as `.npy` bytes (format 1.0 header, C order, no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact: bfloat16 is float32's upper half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def load_npy(data: bytes, dtype: str | None = None) -> np.ndarray:
    """Read a stored encoding. With `dtype="bfloat16"` (the manifest's field dtype) uint16 bit patterns
    are widened to float32; everything else is returned as stored."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if dtype == "bfloat16" and arr.dtype == np.uint16:
        return bf16_bits_to_float32(arr)
    return arr


def field_meta(store_dtype: str, np_dtype: np.dtype) -> dict[str, str]:
    """The manifest's dtype entry for a stored field."""
    if store_dtype == "bfloat16" and np_dtype == np.uint16:
        return {"dtype": "bfloat16", "storage": BF16_STORAGE}
    return {"dtype": np.dtype(np_dtype).name}
