"""`Decoder`: sample bytes to training values, in DataLoader workers (its pieces live beside it:
`members` parses tar members, `images` decodes, `shm` holds batch buffers, `collate` stacks).

A sample arrives as one contiguous byte string (its tar members, read with a single positioned read)
and its members are parsed from memory. JPEGs are decoded by simplejpeg (a default dependency:
libjpeg-turbo, with DCT-domain downscaling to the smallest size that still covers the target), or by
Pillow with `draft()` (the same trick) where it is missing; PNG/WebP go through Pillow. An image batch
is one HxWx3 array per row of a batch tensor that lives in a recycled shared-memory slot: a JPEG whose
decoded size is already the wanted one (native, or reached by DCT scaling) is decoded straight into its
row, and the batch is handed out as a Bx3xHxW channels_last view of it, so nothing is transposed,
handing it to the main process copies nothing and faults no new pages.
"""

from __future__ import annotations

import io
import json
import json.scanner
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from prep.errors import PrepError
from prep.formats.tar_native import NATIVE
from prep.loaders.base import stream_key
from prep.loaders.io.collate import collate_samples, shape_error, stack_column
from prep.loaders.io.images import (
    SizeMismatch,
    decode_image,
    decode_jpeg_run,
    jpeg_backend,
    jpeg_size,
    pil_rgb,
    to_pil,
)
from prep.loaders.io.members import Buffer
from prep.loaders.io.shm import pooled_like, shared_empty, shared_rows
from prep.loaders.skips import BadSample, OnError, skip_or_raise

DecodeMode = Literal["raw", "pil", "uint8", "float"]
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "image", "img"})
TEXT_EXTS = frozenset({"txt", "text", "caption"})
JSON_EXTS = frozenset({"json"})
INT_EXTS = frozenset({"cls", "cls2", "index", "id"})
Parsed = tuple[str, dict[str, Buffer], str, int]  # (key, members, where, epoch) of one read sample
# a Parsed sample with its other members decoded, and the BadSample that will skip it (None: none)
Staged = tuple[str, dict[str, Buffer], str, int, dict[str, Any], "BadSample | None"]
_M = TypeVar("_M")  # what a member is known by: its bytes, or its (start, end) in a read buffer
_BATCH_COLUMNS = getattr(NATIVE, "batch_columns", None)  # plain batches' columns in C, where built


_KINDS: dict[str, str] = {}  # extension -> kind, for the few extensions a dataset has
_JSON_DECODER = json.JSONDecoder()
_JSON_TEXT = _JSON_DECODER.decode  # what json.loads does with a str
_JSON_SCAN = json.scanner.make_scanner(_JSON_DECODER)  # type: ignore[arg-type]  # its C scanner: (value, end)


def member_kind(ext: str) -> str:
    """What a member is, by the last part of its extension, lower-cased (`a.JPG` -> `jpg`)."""
    kind = _KINDS.get(ext)
    if kind is None:
        kind = ext.rsplit(".", 1)[-1].lower()
        if len(_KINDS) < 1024:
            _KINDS[ext] = kind
    return kind


def _text(data: Buffer) -> str:
    """A text member: UTF-8, undecodable bytes replaced, decoded straight from the read buffer."""
    return str(data, "utf-8", "replace")


def _json(data: Buffer) -> Any:
    """`json.loads` of a member's bytes. Plain UTF-8 (no BOM, no NUL in the first 4 bytes: what json's
    encoding test calls UTF-8) is decoded here, straight from the read buffer, and parsed as text: half
    the cost of `json.loads(bytes)`, which runs that test in Python first. Text that is one JSON value
    with no whitespace around it (what writers emit) goes to json's C scanner directly, skipping the two
    Python frames and two regex matches around it (1.5 -> 0.6 us); anything else to `json.loads` itself,
    so its errors and its whitespace rule stand."""
    head = bytes(data[:4])
    if b"\x00" in head or head[:1] in (b"\xef", b"\xfe", b"\xff"):
        return json.loads(bytes(data))
    text = str(data, "utf-8", "surrogatepass")
    try:
        value, end = _JSON_SCAN(text, 0)
    except StopIteration:  # leading whitespace, or not JSON: json says which
        return _JSON_TEXT(text)
    return value if end == len(text) else _JSON_TEXT(text)


def _json_member(ext: str, data: Buffer, key: str, where: str) -> Any:
    """A JSON member's value; a member that is not JSON makes its sample bad."""
    try:
        return _json(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise BadSample(f"member {ext!r} of {key!r} is not JSON ({why})", where,
                        "fix or drop the sample", reason="malformed member") from None


# member kind -> how a batch takes it: 0 an image, 1 text, 2 JSON (text and JSON inline; the codes
# `batch_columns` takes); any other kind through `Decoder.value`
_COLUMN_KINDS = {**dict.fromkeys(IMAGE_EXTS, 0), **dict.fromkeys(TEXT_EXTS, 1), **dict.fromkeys(JSON_EXTS, 2)}


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
    (batches are Bx3xHxW in channels_last memory: the decoder's HxWx3 pixels, no transpose copy); 'float'
    the same as float32 in [0, 1]. Outside 'raw', text members become str, json dicts, cls ints, npy
    arrays (never pickle).
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

    def select(self, key: str, members: dict[str, _M], where: str) -> dict[str, _M]:
        if self.fields is None:
            return members
        out: dict[str, _M] = {}
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
        Image decoders read `data` in place; everything else gets its own bytes or text."""
        if self.mode == "raw":
            return bytes(data)
        kind = member_kind(ext)
        if kind in IMAGE_EXTS:
            if self.mode == "pil":
                if self.image_size is None:
                    return pil_rgb(data, None, where)
                return to_pil(decode_image(data, self.image_size, self.crop, self._rnd(key, epoch), where))
            arr = decode_image(data, self.image_size, self.crop, self._rnd(key, epoch), where)
            t = torch.from_numpy(arr).permute(2, 0, 1)
            return t.float().div_(255) if self.mode == "float" else t
        if kind in TEXT_EXTS:
            return _text(data)
        if kind in JSON_EXTS:
            return _json_member(ext, data, key, where)
        raw = bytes(data)
        if kind in INT_EXTS:
            try:
                return int(raw)
            except ValueError:
                raise BadSample(f"member {ext!r} of {key!r} is not an integer", where,
                                "fix or drop the sample", reason="malformed member") from None
        if kind == "npy":
            try:
                return np.load(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, EOFError, OSError) as err:
                raise BadSample(
                    f"member {ext!r} of {key!r} is not a plain .npy array ({err})",
                    where,
                    "write encodings as plain numeric .npy (object arrays would need pickle)",
                    reason="malformed member",
                ) from None
        return raw

    def decode_batch(
        self,
        parsed: Sequence[Parsed | None],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
        collate: Callable[[list[dict[str, Any]]], Any] | None,
    ) -> Any:
        """Decode and collate samples given as (key, members, where, epoch) (None: already skipped).

        Without a per-sample transform, images are decoded straight into one shared batch tensor (a
        shared-memory slot in a worker), allocated at `image_size`, or at the native size of the batch's
        first image (every image of the batch must then have that size, as stacking would require). The
        batch is Bx3xHxW in channels_last memory: the HxWx3 pixels as decoded, no transpose copy. A bad
        sample is dropped from the batch (and recorded) or raised, as `on_error` says."""
        selected: list[Parsed] = []
        if self.fields is None:  # every member is kept
            selected = [item for item in parsed if item is not None]
        for item in parsed if self.fields is not None else ():
            if item is None:
                continue
            k, m, where, e = item
            try:
                selected.append((k, self.select(k, m, where), where, e))
            except BadSample as err:
                skip_or_raise(err, self.on_error, k)
        hooks = transform is not None or collate is not None
        if hooks or self.mode not in ("uint8", "float") or not selected:
            samples = [s for s in self.finish_all(selected, transform) if s is not None]
            return (collate or collate_samples)(samples)
        image_exts = [e for e in selected[0][1] if member_kind(e) in IMAGE_EXTS]

        def new_rows(h: int, w: int) -> torch.Tensor:
            return self._new_rows(len(selected), h, w)

        bufs = {ext: new_rows(*self.image_size) for ext in image_exts} if self.image_size else {}
        arrs = {ext: b.numpy() for ext, b in bufs.items()}
        # The other members first, for the whole batch, then the images one after another: each decode
        # sweeps the CPU caches, so Python work between decodes runs cold (it cost about twice as much).
        # A sample's errors are still told in order: a missing or bad image before a bad other member.
        staged = self._other_members(selected, image_exts)
        done = self._plain_jpegs(staged, image_exts, bufs, arrs, new_rows)
        rest: list[dict[str, Any]] = [{"__key__": k, **values} for k, _, _, _, values, _ in staged[:done]]
        size, crop, seeded = self.image_size, self.crop, self.crop == "random"
        for k, m, where, epoch, values, held in staged[done:]:
            row = len(rest)
            try:
                for ext in image_exts:
                    if ext not in m:
                        raise BadSample(f"sample {k!r} lacks {ext!r}, which the batch's first sample has",
                                        where, "pass fields=[...] so every sample has the same members",
                                        reason="missing member")
                    rnd = self._rnd(k, epoch) if seeded else 0
                    if ext not in arrs:  # native size: the first good image sets the batch's shape
                        self._first_image(m[ext], rnd, where, row, bufs, arrs, ext, new_rows)
                    else:
                        decode_image(m[ext], size, crop, rnd, where, out=arrs[ext][row])
                if held is not None:
                    raise held
            except BadSample as err:
                skip_or_raise(err, self.on_error, k)
                continue
            except SizeMismatch as err:
                have = arrs[ext].shape[1:3]
                raise shape_error(ext, [(3, *have), (3, *err.got)]) from None
            rest.append({"__key__": k, **values})
        return self._with_images(collate_samples(rest), bufs, len(rest))

    def _new_rows(self, n: int, h: int, w: int) -> torch.Tensor:
        """n rows of h x w x 3 pixels to decode into: a shared-memory slot, or private memory for float
        batches (converted into the slot that travels by `_with_images`)."""
        if self.mode == "float":
            return torch.empty((n, h, w, 3), dtype=torch.uint8)
        return shared_empty((n, h, w, 3), torch.uint8)

    def _with_images(self, batch: dict[str, Any], bufs: dict[str, torch.Tensor], n: int) -> dict[str, Any]:
        """`batch` with the first n decoded rows of each image member, as Bx3xHxW channels_last views."""
        for ext, buf in bufs.items():
            if self.mode == "float":
                out = shared_empty((n, *buf.shape[1:]), torch.float32)
                torch.div(buf[:n], 255, out=out)
                buf = out
            batch[ext] = pooled_like(buf[:n].permute(0, 3, 1, 2), buf)
        return batch

    def plain_batch(self, view: memoryview, found: Sequence[Any]) -> dict[str, Any] | None:
        """The batch of a read buffer's samples (`found`: `members.batch_member_spans` of `view`) in one
        pass, where it is the plain case: decode uint8 or float, no `fields`, every sample parsed with the
        first one's members, one image member, a JPEG that decodes straight into its row, the others text
        or JSON (one value, no whitespace around it). The same batch as `decode_batch` gives, built by the
        C helper without a Python step per sample (~40 calls a sample, each run cold after the decodes).
        None otherwise: `decode_batch` then takes the batch sample by sample, and says what is wrong."""
        plain_mode = self.mode in ("uint8", "float") and self.fields is None
        if _BATCH_COLUMNS is None or not plain_mode or not found:
            return None
        first = found[0]
        if type(first) is not tuple:
            return None
        kinds = {x: _COLUMN_KINDS.get(member_kind(x), -1) for x in first[1]}
        images = [x for x, code in kinds.items() if code == 0]
        if len(images) != 1 or -1 in kinds.values():
            return None
        got = _BATCH_COLUMNS(view, found, kinds, _JSON_SCAN)
        if got is None:
            return None
        keys, columns = got
        image = images[0]
        datas = next(values for x, values in columns if x == image)
        hw = self.image_size or jpeg_size(datas[0])
        if hw is None:
            return None
        n = len(keys)
        buf: torch.Tensor | None = None
        if self.mode == "uint8":  # decoded straight into the batch's views (`shared_rows`)
            rows, pixels = shared_rows(n, *hw)
        else:
            buf = self._new_rows(n, *hw)
            rows, pixels = buf.numpy(), None
        if decode_jpeg_run(datas, self.image_size, rows) != n:
            return None  # an image of another size, or one simplejpeg does not take: said per sample
        batch: dict[str, Any] = {"__key__": keys}
        batch.update((x, stack_column(x, values)) for x, values in columns if x != image)
        if buf is not None:
            return self._with_images(batch, {image: buf}, n)
        batch[image] = pixels
        return batch

    def _other_members(self, selected: Sequence[Parsed], image_exts: list[str]) -> list[Staged]:
        """Each sample with its non-image members decoded, and the error that will skip it (held, so that
        a bad image of the same sample, found later, is the one told)."""
        staged: list[Staged] = []
        value = self.value
        # per extension, looked up once a batch: 0 the batch's images (decoded later), 1 text, 2 JSON,
        # -1 anything else, an image of another extension than the first sample's included
        codes = dict.fromkeys(image_exts, 0)
        for k, m, where, epoch in selected:
            values: dict[str, Any] = {}
            held: BadSample | None = None
            try:
                for x, d in m.items():
                    code = codes.get(x)
                    if code is None:
                        code = codes[x] = _COLUMN_KINDS.get(member_kind(x)) or -1
                    if code == 1:  # inline, text and JSON: the most common members after images
                        values[x] = _text(d)
                    elif code == 2:
                        values[x] = _json_member(x, d, k, where)
                    elif code == -1:
                        values[x] = value(x, d, k, epoch, where)
            except BadSample as err:
                held = err
            staged.append((k, m, where, epoch, values, held))
        return staged

    def _plain_jpegs(self, staged: Sequence[Staged],
                     image_exts: list[str], bufs: dict[str, torch.Tensor], arrs: dict[str, np.ndarray],
                     new_rows: Callable[[int, int], torch.Tensor]) -> int:
        """Decode the batch's leading samples in one run (`images.decode_jpeg_run`) while each is the plain
        case: one image member, no error held, a JPEG that decodes straight into its row. Returns how many;
        the per-sample loop takes over from the first other one, at its row. At native size the rows are
        sized from the first image's header, and dropped if that image does not decode (the per-sample
        loop then lets the first good image set the shape, as always)."""
        if len(image_exts) != 1:
            return 0
        ext = image_exts[0]
        lead: list[Buffer] = []
        for _, m, _, _, _, held in staged:
            if held is not None or ext not in m:
                break
            lead.append(m[ext])
        if not lead:
            return 0
        fresh = ext not in arrs
        if fresh:
            hw = jpeg_size(lead[0])
            if hw is None:
                return 0
            bufs[ext] = new_rows(*hw)
            arrs[ext] = bufs[ext].numpy()
        done = decode_jpeg_run(lead, self.image_size, arrs[ext])
        if done == 0 and fresh:
            del bufs[ext], arrs[ext]
        return done

    def _first_image(self, data: Buffer, rnd: int, where: str, row: int, bufs: dict[str, torch.Tensor],
                     arrs: dict[str, np.ndarray], ext: str,
                     new_rows: Callable[[int, int], torch.Tensor]) -> None:
        """The batch's first good image at native size: its rows are allocated at its size (read from a JPEG
        header, so it decodes straight into its row; other formats are decoded first, then copied). An
        image that fails leaves no rows behind: the next good one sets the shape."""
        hw = jpeg_size(data)
        if hw is None:
            first = decode_image(data, None, self.crop, rnd, where)
            bufs[ext] = new_rows(*first.shape[:2])
            arrs[ext] = bufs[ext].numpy()
            arrs[ext][row] = first
            return
        bufs[ext] = new_rows(*hw)
        arrs[ext] = bufs[ext].numpy()
        try:
            decode_image(data, None, self.crop, rnd, where, out=arrs[ext][row])
        except BadSample:
            del bufs[ext], arrs[ext]
            raise

    def finish_all(
        self,
        selected: Sequence[Parsed | None],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> list[dict[str, Any] | None]:
        """`finish` for each (key, members, where, epoch) (None: already skipped), in place: a bad sample
        is recorded and left as None (what `fetch_samples` returns), or raised."""
        out: list[dict[str, Any] | None] = []
        for item in selected:
            sample = None
            if item is not None:
                k, m, w, e = item
                try:
                    sample = self.finish(k, m, e, w, transform)
                except BadSample as err:
                    skip_or_raise(err, self.on_error, k)
            out.append(sample)
        return out

    def finish(
        self,
        key: str,
        members: dict[str, Buffer],
        epoch: int,
        where: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> dict[str, Any]:
        """One sample, decoded then transformed (not collated): what `fetch_samples` returns."""
        sample = {"__key__": key, **{e: self.value(e, d, key, epoch, where) for e, d in members.items()}}
        return transform(sample) if transform is not None else sample


