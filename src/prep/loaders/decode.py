"""Sample bytes to training tensors: member parsing, decoding, resize + crop, collation.

Runs in DataLoader workers. A sample arrives as one contiguous byte string (its tar members, read with a
single positioned read) and its members are parsed from memory. JPEGs are decoded by simplejpeg (a default
dependency: libjpeg-turbo, with DCT-domain downscaling to the smallest size that still covers the
target), or by Pillow with `draft()` (the same trick) where it is missing; PNG/WebP go through Pillow. When a
decoded JPEG already has the target size it is written straight into the batch tensor, which lives in
a recycled shared-memory slot, so handing it to the main process copies nothing and faults no new pages.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from prep.errors import PrepError
from prep.formats.names import read_member_name
from prep.formats.tar import iter_samples
from prep.loaders import torch_private
from prep.loaders.base import stream_key
from prep.loaders.skips import BadSample, OnError, skip_or_raise

try:  # a default dependency; an install without a wheel for this platform still decodes, with Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    simplejpeg = None

DecodeMode = Literal["raw", "pil", "uint8", "float"]
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "image", "img"})
TEXT_EXTS = frozenset({"txt", "text", "caption"})
JSON_EXTS = frozenset({"json"})
INT_EXTS = frozenset({"cls", "cls2", "index", "id"})
_BLOCK = 512


def jpeg_backend() -> str:
    """The JPEG decoder this process uses: 'simplejpeg' when installed, else 'pil'."""
    return "simplejpeg" if simplejpeg is not None else "pil"


# -------------------------------------------------------------------------------------- tar members
_IDX_FIX = "the .idx does not match the tar: rebuild it with `prep run generate_wdinfo`"
_RECORD = "unreadable record"
Buffer = bytes | memoryview


def member_spans(buf: Buffer, where: str) -> tuple[str, dict[str, tuple[int, int]]] | None:
    """(key, {extension: (start, end)}) of one sample's bytes, parsed from memory. Handles plain ustar
    headers (what prep, tarfile and img2dataset write); returns None for anything else (pax records, GNU
    long names, pre-POSIX tars), which `parse_sample` hands to the full scanner. Kept lean: it runs for
    every sample the loader reads."""
    spans: dict[str, tuple[int, int]] = {}
    key: str | None = None
    pos, n = 0, len(buf)
    view = isinstance(buf, memoryview)
    while pos + _BLOCK <= n:
        header = bytes(buf[pos : pos + _BLOCK]) if view else buf[pos : pos + _BLOCK]
        if (
            not header.startswith(b"ustar", 257)
            or header[156] not in (0x30, 0)
            or header[345]
            or header[124] & 0x80
        ):
            if header[0] == 0 and header.count(0) == _BLOCK:
                break  # end-of-archive blocks
            return None
        try:
            size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
        except ValueError:
            raise BadSample("corrupt tar header inside a sample", where, _IDX_FIX, reason=_RECORD) from None
        end = header.find(b"\x00", 0, 100)
        name = header[: 100 if end < 0 else end].decode("utf-8", "surrogateescape")
        data_start = pos + _BLOCK
        pos = data_start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        parts = read_member_name(name, where)
        if parts is None:
            continue  # a metadata member or no extension: not part of the sample (the scanner's rule)
        k, ext = parts
        if key is None:
            key = k
        elif k != key:
            raise BadSample(f"sample bytes hold two keys ({key!r}, {k!r})", where, _IDX_FIX, reason=_RECORD)
        if data_start + size > n:
            raise BadSample(f"member {name!r} runs past the sample's end", where, _IDX_FIX, reason=_RECORD)
        spans[ext] = (data_start, data_start + size)
    if key is None:
        if pos == 0 and n >= _BLOCK:
            return None  # not a ustar header where the sample should start: let the scanner say why
        raise BadSample("no sample members at this offset", where, _IDX_FIX, reason=_RECORD)
    return key, spans


def parse_sample(buf: Buffer, where: str) -> tuple[str, dict[str, Buffer]]:
    """(key, {extension: data}) of one sample's bytes; values are slices of `buf` (memoryviews stay views)."""
    parsed = member_spans(buf, where)
    if parsed is None:
        return _parse_slow(bytes(buf), where)
    key, spans = parsed
    return key, {ext: buf[a:b] for ext, (a, b) in spans.items()}


def _parse_slow(buf: bytes, where: str) -> tuple[str, dict[str, Buffer]]:
    try:
        samples = list(iter_samples(io.BytesIO(buf), where, read_data=True))
    except PrepError as err:
        raise BadSample(f"no valid tar sample at this offset ({err.what})", where, _IDX_FIX,
                        reason=_RECORD) from None
    if len(samples) != 1 or samples[0].data is None:
        raise BadSample(f"expected one sample at this offset, found {len(samples)}", where, _IDX_FIX,
                        reason=_RECORD)
    return samples[0].key, dict(samples[0].data)


# ------------------------------------------------------------------------------------------- images
def _cover_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """The smallest (h', w') with the aspect of (h, w) that covers (th, tw)."""
    s = max(th / h, tw / w)
    return max(th, math.ceil(h * s - 1e-6)), max(tw, math.ceil(w * s - 1e-6))


def crop_box(h: int, w: int, th: int, tw: int, how: str, rnd: int) -> tuple[int, int]:
    """Top-left corner of a (th, tw) crop of an (h, w) image: centred, or at a seeded random place."""
    if how == "random":
        return (rnd % (h - th + 1)), ((rnd >> 20) % (w - tw + 1))
    return (h - th) // 2, (w - tw) // 2


def _pil_rgb(data: bytes, cover: tuple[int, int, int, int] | None, where: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if cover is not None and img.format == "JPEG":
            th, tw = _cover_size(img.height, img.width, cover[0], cover[1])
            img.draft("RGB", (tw, th))
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample(f"cannot decode image: {decode_reason(err)}", where,
                        "drop or re-encode this sample", reason="corrupt image") from None


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def decode_reason(err: Exception) -> str:
    """Why Pillow could not decode, without the repr of the in-memory file it was given."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow knows (truncated or not an image)"
    return _OBJECT_REPR.sub("the image bytes", str(err)) or type(err).__name__


def decode_image(
    data: bytes, size: tuple[int, int] | None, crop: str, rnd: int, where: str, out: np.ndarray | None = None
) -> np.ndarray:
    """HxWx3 uint8 RGB; with `size`, resized to cover it and cropped to exactly (H, W). Writes into `out`
    (an HxWx3 view) when given."""
    from PIL import Image

    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            if size is None or (h, w) == size:
                return (
                    simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
                    if out is not None
                    else simplejpeg.decode_jpeg(data, colorspace="RGB")
                )
            ch, cw = _cover_size(h, w, *size)
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=ch, min_width=cw)
            img = Image.fromarray(arr)
        except ValueError:
            img = _pil_rgb(
                data, (*size, 0, 0) if size else None, where
            )  # e.g. CMYK JPEGs: Pillow handles them
    else:
        img = _pil_rgb(data, (*size, 0, 0) if size else None, where)
    if size is not None and (img.height, img.width) != size:
        ch, cw = _cover_size(img.height, img.width, *size)
        if (img.height, img.width) != (ch, cw):
            img = img.resize((cw, ch), Image.BICUBIC, reducing_gap=None)
        top, left = crop_box(ch, cw, size[0], size[1], crop, rnd)
        img = img.crop((left, top, left + size[1], top + size[0]))
    if out is not None:
        out[...] = np.asarray(img)
        return out
    return np.array(img)  # a writable copy: it becomes a tensor


# ------------------------------------------------------------------------------ shared batch buffers
# A batch tensor made in a DataLoader worker reaches the main process through shared memory. torch's
# default is a fresh segment per tensor: every page is faulted in anew, and the segment's descriptor
# travels over a socket round trip (~2 ms) per tensor. Instead, each worker keeps a few segments
# ("slots"), sends a slot's descriptor once, and afterwards only its (slot, generation, layout); the
# main process marks a slot free again when the last tensor viewing it is garbage-collected. With no
# free slot (a trainer that holds on to many batches), a worker falls back to a fresh segment.
_HEADER = 64  # bytes at the start of a slot: int64 [state (1 = handed out), unused], keeps data aligned
_SLOTS_PER_WORKER = 6


class _PooledTensor(torch.Tensor):
    """A worker-side view of a slot; pickles as a slot reference. Operations on it give plain tensors.
    (Only made where `torch_private.slots_supported()`.)"""

    if torch_private.disabled_torch_function_impl() is not None:
        __torch_function__ = torch_private.disabled_torch_function_impl()
    _prep_slot: _Slot
    _prep_gen: int


class _Slot:
    def __init__(self, nbytes: int) -> None:
        self.whole = _fresh_shared((_HEADER + nbytes,), torch.uint8)
        self.state = self.whole.numpy()[:16].view(np.int64)
        self.cap = nbytes
        self.index = 0
        self.gen = 0
        self.sent = False


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


_WORKER_SLOTS: _WorkerSlots | None = None


def _slot_size(nbytes: int) -> int:
    """Room for `nbytes` rounded up to a power of two (at least 64 KiB), so batches that vary a little in
    size (raw bytes, short last batches) reuse a slot instead of regrowing it. Untouched shared-memory
    pages cost nothing."""
    return max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())


_fresh_shared = torch_private.new_shared


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
    slots = _worker_slots()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = math.prod(shape)
    slot = slots.take(n * itemsize)
    if slot is None:
        slots.fresh += 1
        return _fresh_shared(shape, dtype)
    flat = slot.whole[_HEADER : _HEADER + n * itemsize].view(dtype)
    return _pooled(flat.view(tuple(shape)), slot)


def _pooled(t: torch.Tensor, slot: _Slot) -> torch.Tensor:
    out = t.as_subclass(_PooledTensor)
    out._prep_slot, out._prep_gen = slot, slot.gen
    return out


def pooled_like(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`t` (a view of `base`) keeps travelling as a slot reference when `base` is a slot view."""
    return _pooled(t, base._prep_slot) if isinstance(base, _PooledTensor) else t


class SlotBytes(list):
    """A worker's list of byte strings that are slices of a slot: it pickles as (slot, spans), so the
    bytes cross to the main process through shared memory instead of being pickled into the result pipe.
    A list that was changed after it was made pickles as a plain list."""

    __slots__ = ("_buf", "_items", "_spans")

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
    mv = memoryview(buf.numpy())
    return [mv[spans[k] : spans[k + 1]].tobytes() for k in range(0, len(spans), 2)]


def _reduce_pooled(t: _PooledTensor):
    reduce_tensor = torch_private.tensor_reducer()
    slot = t._prep_slot
    plain = t.as_subclass(torch.Tensor)
    if reduce_tensor is None:
        raise RuntimeError("a slot view exists without torch's tensor reducer")  # made only where it is
    if (
        _WORKER_SLOTS is None
        or t._prep_gen != slot.gen
        or plain.untyped_storage().data_ptr() != (slot.whole.untyped_storage().data_ptr())
    ):
        return reduce_tensor(plain)  # not (or no longer) a view of its slot: torch's own way
    storage = None if slot.sent else slot.whole.untyped_storage()
    slot.sent = True
    layout = (plain.storage_offset() * plain.element_size(), tuple(plain.shape), plain.stride(), plain.dtype)
    return _rebuild_pooled, (_WORKER_SLOTS.token, slot.index, slot.gen, storage, layout)


# main-process side: (token, slot) -> (whole slot as numpy, its state header); live handouts by generation
_MAIN_SLOTS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
_LIVE: dict[tuple[str, int], tuple[int, Any]] = {}


def _release(state: np.ndarray) -> None:
    state[0] = 0


def _rebuild_pooled(token: str, i: int, gen: int, storage: Any, layout: tuple[Any, ...]) -> torch.Tensor:
    import weakref

    key = (token, i)
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
        weakref.finalize(base, _release, state)
        _LIVE[key] = gen, weakref.ref(base)
    offset, shape, stride, dtype = layout
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flat = torch.from_numpy(base)
    flat = flat[: flat.numel() // itemsize * itemsize].view(dtype)
    return flat.as_strided(shape, stride, (offset - _HEADER) // itemsize)


def _forget_dead_workers() -> None:
    """Drop the slots of workers that have exited (tensors still viewing them keep their memory)."""
    import os

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
    another type) keeps every slot: a slot freed while its memory is still on its way would be reused."""
    ranges = [(_storage_ptr(s.whole), _storage_ptr(s.whole) + _HEADER + s.cap, id(s)) for s in taken]
    found: set[int] = set()

    def hit(ptr: int) -> None:
        found.update(i for lo, hi, i in ranges if lo <= ptr < hi)

    def walk(x: Any, depth: int) -> bool:
        if isinstance(x, _SCALARS):
            return True
        if depth > _MAX_DEPTH:
            return False
        if isinstance(x, SlotBytes):
            if x.__reduce_ex__(2)[0] is _bytes_from_slot:
                hit(_storage_ptr(x._buf))
            return True  # else it pickles as a list of bytes copies
        if isinstance(x, torch.Tensor):
            hit(_storage_ptr(x))
            return True
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                return False
            hit(x.__array_interface__["data"][0])
            return True
        if isinstance(x, Mapping):
            return all(walk(k, depth + 1) and walk(v, depth + 1) for k, v in x.items())
        if isinstance(x, list | tuple | set | frozenset):
            return all(walk(v, depth + 1) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return all(walk(getattr(x, f.name), depth + 1) for f in dataclasses.fields(x))
        return _is_pil_image(x)  # PIL images pickle their pixels as bytes

    if not taken or not walk(obj, 0):
        return {id(s) for s in taken}
    return found


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type == "cpu" else -1


def _is_pil_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _register_reducer() -> None:
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(_PooledTensor, _reduce_pooled)


_register_reducer()


def _field_alternatives(fields: Sequence[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if fields is None:
        return None
    out = []
    for f in fields:
        alts = tuple(a.strip().lstrip(".") for a in f.split("|") if a.strip())
        if not alts:
            raise PrepError(
                f"empty field name in {list(fields)}", "fields", "name member extensions, e.g. ['jpg', 'txt']"
            )
        out.append((alts[0], alts))
    return tuple(out)


@dataclass(frozen=True)
class Decoder:
    """How member bytes become sample values. Picklable; built once, used in every worker.

    mode: 'raw' keeps every member as bytes; 'pil' gives PIL images; 'uint8' gives CxHxW uint8 tensors
    (batches are Bx3xHxW in channels_last memory, so no transpose copy); 'float' the same as float32 in
    [0, 1]. Outside 'raw', text members become str, json dicts, cls ints, npy arrays (never pickle).
    """

    mode: DecodeMode = "uint8"
    image_size: tuple[int, int] | None = None
    crop: Literal["center", "random"] = "center"
    fields: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    seed: int = 0
    on_error: OnError = "skip"

    @classmethod
    def make(
        cls,
        mode: str,
        image_size: int | Sequence[int] | None,
        crop: str,
        fields: Sequence[str] | None,
        seed: int,
        on_error: OnError = "skip",
    ) -> Decoder:
        if mode not in ("raw", "pil", "uint8", "float"):
            raise PrepError(
                f"decode={mode!r} is not one of raw, pil, uint8, float",
                "decode",
                "pick one, or pass decode='raw' and a transform that decodes",
            )
        if crop not in ("center", "random"):
            raise PrepError(f"crop={crop!r} is not center or random", "crop", "pick one")
        size: tuple[int, int] | None = None
        if image_size is not None:
            size = (
                (int(image_size), int(image_size))
                if isinstance(image_size, int)
                else (int(image_size[0]), int(image_size[1]))
            )
            if min(size) < 1:
                raise PrepError(
                    f"image_size {image_size} is not positive", "image_size", "use e.g. 256 or (256, 384)"
                )
        return cls(mode, size, crop, _field_alternatives(fields), seed, on_error)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "image_size": self.image_size,
            "crop": self.crop,
            "fields": [a[0] for a in self.fields] if self.fields else None,
            "jpeg": jpeg_backend(),
        }

    def select(self, key: str, members: dict[str, bytes], where: str) -> dict[str, bytes]:
        if self.fields is None:
            return members
        out: dict[str, bytes] = {}
        for name, alts in self.fields:
            for a in alts:
                if a in members:
                    out[name] = members[a]
                    break
            else:
                raise BadSample(
                    f"sample {key!r} has no {'|'.join(alts)} member (it has {sorted(members)})",
                    where,
                    "filter the shards, or list only fields every sample has",
                    reason="missing member",
                )
        return out

    def _rnd(self, key: str, epoch: int) -> int:
        return stream_key(self.seed, key, "crop", epoch) if self.crop == "random" else 0

    def value(self, ext: str, data: Buffer, key: str, epoch: int, where: str) -> Any:
        """One member's decoded value (per-sample path; batches of images take `decode_batch`'s fast path).
        Image decoders read `data` in place; everything else gets its own bytes."""
        if self.mode == "raw":
            return bytes(data)
        kind = ext.rsplit(".", 1)[-1].lower()
        if kind not in IMAGE_EXTS:
            data = bytes(data)
        if kind in IMAGE_EXTS:
            if self.mode == "pil":
                if self.image_size is None:
                    return _pil_rgb(data, None, where)
                return _to_pil(decode_image(data, self.image_size, self.crop, self._rnd(key, epoch), where))
            arr = decode_image(data, self.image_size, self.crop, self._rnd(key, epoch), where)
            t = torch.from_numpy(arr).permute(2, 0, 1)
            return t.float().div_(255) if self.mode == "float" else t
        if kind in TEXT_EXTS:
            return data.decode("utf-8", "replace")
        if kind in JSON_EXTS:
            try:
                return json.loads(data)
            except json.JSONDecodeError as err:
                raise BadSample(f"member {ext!r} of {key!r} is not JSON ({err.msg})", where,
                                "fix or drop the sample", reason="malformed member") from None
        if kind in INT_EXTS:
            try:
                return int(data)
            except ValueError:
                raise BadSample(f"member {ext!r} of {key!r} is not an integer", where,
                                "fix or drop the sample", reason="malformed member") from None
        if kind == "npy":
            try:
                return np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, EOFError, OSError) as err:
                raise BadSample(
                    f"member {ext!r} of {key!r} is not a plain .npy array ({err})",
                    where,
                    "write encodings as plain numeric .npy (object arrays would need pickle)",
                    reason="malformed member",
                ) from None
        return data

    def decode_batch(
        self,
        parsed: Sequence[tuple[str, dict[str, bytes], str, int]],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
        collate: Callable[[list[dict[str, Any]]], Any] | None,
    ) -> Any:
        """Decode and collate samples given as (key, members, where, epoch). Images of a fixed
        `image_size` are decoded straight into one shared batch tensor when no per-sample transform needs
        them first. A bad sample is dropped from the batch (and recorded) or raised, as `on_error` says."""
        selected = []
        for k, m, w, e in parsed:
            try:
                selected.append((k, self.select(k, m, w), w, e))
            except BadSample as err:
                skip_or_raise(err, self.on_error, k)
        if (
            transform is not None
            or collate is not None
            or self.mode not in ("uint8", "float")
            or self.image_size is None
            or not selected
        ):
            return (collate or collate_samples)(self.finish_all(selected, transform))
        first = selected[0][1]
        image_exts = [e for e in first if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
        h, w = self.image_size
        shape = (len(selected), h, w, 3)
        # float batches decode into private memory and convert into the slot that travels
        private = self.mode == "float"
        bufs = {
            ext: torch.empty(shape, dtype=torch.uint8) if private else shared_empty(shape, torch.uint8)
            for ext in image_exts
        }
        arrs = {ext: b.numpy() for ext, b in bufs.items()}
        rest: list[dict[str, Any]] = []
        for k, m, where, epoch in selected:
            row = len(rest)
            try:
                for ext in image_exts:
                    if ext not in m:
                        raise BadSample(f"sample {k!r} lacks {ext!r}, which the batch's first sample has",
                                        where, "pass fields=[...] so every sample has the same members",
                                        reason="missing member")
                    decode_image(m[ext], self.image_size, self.crop, self._rnd(k, epoch), where,
                                 out=arrs[ext][row])
                values = {x: self.value(x, d, k, epoch, where) for x, d in m.items() if x not in bufs}
            except BadSample as err:
                skip_or_raise(err, self.on_error, k)
                continue
            rest.append({"__key__": k, **values})
        batch = collate_samples(rest)
        n = len(rest)
        for ext, buf in bufs.items():
            if private:
                out = shared_empty((n, h, w, 3), torch.float32)
                torch.div(buf[:n], 255, out=out)
                buf = out
            batch[ext] = pooled_like(buf[:n].permute(0, 3, 1, 2), buf)
        return batch

    def finish_all(
        self,
        selected: Sequence[tuple[str, dict[str, bytes], str, int] | None],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
        *,
        keep_places: bool = False,
    ) -> list[dict[str, Any] | None]:
        """`finish` for each (key, members, where, epoch) (None: already skipped). Bad samples are
        recorded and dropped, or left as None with `keep_places` (for `fetch_samples`); or raised."""
        out: list[dict[str, Any] | None] = []
        for item in selected:
            sample = None
            if item is not None:
                k, m, w, e = item
                try:
                    sample = self.finish(k, m, e, w, transform)
                except BadSample as err:
                    skip_or_raise(err, self.on_error, k)
            if sample is not None or keep_places:
                out.append(sample)
        return out

    def finish(
        self,
        key: str,
        members: dict[str, bytes],
        epoch: int,
        where: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> dict[str, Any]:
        """One sample, decoded then transformed (not collated): what `fetch_samples` returns."""
        sample = {"__key__": key, **{e: self.value(e, d, key, epoch, where) for e, d in members.items()}}
        return transform(sample) if transform is not None else sample


def _to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------- collation
def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (same-shape tensors and arrays, numbers), list the rest (str, bytes, dicts, PIL).

    An empty list gives {"__key__": []} (a rank's slice of a short final batch can be empty)."""
    if not samples:
        return {"__key__": []}
    out: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = _stack(name, values)
    return out


def _stack(name: str, values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor | np.ndarray) and all(
        type(v) is type(first) and v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        tensors = [torch.as_tensor(v) for v in values]
        out = shared_empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
        return torch.stack(tensors, out=out)
    if isinstance(first, torch.Tensor | np.ndarray):
        shapes = sorted({tuple(v.shape) for v in values})
        raise PrepError(
            f"field {name!r} has different shapes in one batch: {shapes[:4]}",
            "collate",
            "set image_size=... (resize + crop), use aspect-ratio buckets, or pass collate=",
        )
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return torch.tensor(values)
    return values
