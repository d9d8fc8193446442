"""Image bytes to pixels: simplejpeg (libjpeg-turbo with DCT-domain downscaling) where installed,
else Pillow with `draft()`; resize to cover the target, then crop."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import numpy as np

from prep.formats.pixels import to_rgb
from prep.formats.tar_native import NATIVE
from prep.loaders.io.members import Buffer
from prep.loaders.skips import BadSample

try:  # a default dependency; an install without a wheel for this platform still decodes, with Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    simplejpeg = None


_NATIVE_JPEG_SIZE = getattr(NATIVE, "jpeg_size", None)


def jpeg_backend() -> str:
    """The JPEG decoder this process uses: 'simplejpeg' when installed, else 'pil'."""
    return "simplejpeg" if simplejpeg is not None else "pil"


def jpeg_size(data: Buffer) -> tuple[int, int] | None:
    """(H, W) of a JPEG that simplejpeg decodes, from its frame header: read by the C helper where built
    (~0.2 us; simplejpeg's header read sets up a whole decoder, ~1.4 us), else by simplejpeg. None where
    neither finds it (learnt by decoding, or not a JPEG simplejpeg takes)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    got = _NATIVE_JPEG_SIZE(data) if _NATIVE_JPEG_SIZE is not None else None
    if got is not None:
        return got
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return h, w


def _cover_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """The smallest (h', w') with the aspect of (h, w) that covers (th, tw)."""
    s = max(th / h, tw / w)
    return max(th, math.ceil(h * s - 1e-6)), max(tw, math.ceil(w * s - 1e-6))


def crop_box(h: int, w: int, th: int, tw: int, how: str, rnd: int) -> tuple[int, int]:
    """Top-left corner of a (th, tw) crop of an (h, w) image: centred, or at a seeded random place."""
    if how == "random":
        return (rnd % (h - th + 1)), ((rnd >> 20) % (w - tw + 1))
    return (h - th) // 2, (w - tw) // 2


def pil_rgb(data: Buffer, target: tuple[int, int] | None, where: str):
    """A Pillow RGB image; a JPEG is DCT-downscaled by `draft()` towards covering `target` (H, W)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if target is not None and img.format == "JPEG":
            th, tw = _cover_size(img.height, img.width, *target)
            img.draft("RGB", (tw, th))
        img.load()  # the whole decode here, where a truncated file is a bad sample
        return to_rgb(img)
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


class SizeMismatch(Exception):
    """An image whose native size differs from the batch row it was to be decoded into (`got`: H, W)."""

    def __init__(self, got: tuple[int, int]) -> None:
        super().__init__(got)
        self.got = got


def decode_image(
    data: Buffer, size: tuple[int, int] | None, crop: str, rnd: int, where: str, out: np.ndarray | None = None
) -> np.ndarray:
    """HxWx3 uint8 RGB; with `size`, resized to cover it and cropped to exactly (H, W).

    With `out` (an HxWx3 view, e.g. a row of a shared-memory batch) the pixels are written there, and a
    JPEG whose decoded size (native, or DCT-scaled towards `size`) is already the wanted one is decoded
    straight into it, with no intermediate array. Without `size`, an image of another size than `out`
    raises `SizeMismatch`."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        arr = _simplejpeg(data, size, crop, rnd, out)
        if arr is not None:
            return arr
    return _fit(pil_rgb(data, size, where), size, crop, rnd, out)


def _simplejpeg(
    data: Buffer, size: tuple[int, int] | None, crop: str, rnd: int, out: np.ndarray | None
) -> np.ndarray | None:
    """`decode_image` by simplejpeg; None where it cannot decode these bytes (e.g. CMYK: Pillow can)."""
    if size is None and out is not None:
        return _native_into(data, out)
    hw = jpeg_size(data)
    if hw is None:
        return None
    try:
        if size is None:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        ch, cw, dh, dw = _scaled_size(data, *hw, size)
        if (dh, dw) == size:  # the DCT scaling alone reaches the target (e.g. 256 -> 128, or 224 = 7/8)
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=ch, min_width=cw, buffer=out)
            if arr.shape[:2] == size:
                return arr
            return None  # the frame header misled us (never seen): the slow path decodes it afresh
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=ch, min_width=cw)
    except ValueError:
        return None
    return _fit(arr, size, crop, rnd, out)


def decode_jpeg_run(datas: Sequence[Buffer], size: tuple[int, int] | None, rows: np.ndarray) -> int:
    """Decode the leading images of `datas` straight into rows[0], rows[1], ... while each is the plain
    case of `decode_image`: a JPEG simplejpeg reads whose decoded size (native, or DCT-scaled towards
    `size`) is exactly a row's. Returns how many were decoded; the first one that is not such a case, or
    fails, is left (with the rest) to `decode_image`, which says why. One tight loop: between decodes,
    which sweep the CPU caches, there is as little Python to run cold as there can be."""
    if simplejpeg is None:
        return 0
    want = rows.shape[1:3]
    plan: list[tuple[Buffer, int, int]] = []
    for data in datas:
        hw = jpeg_size(data)
        if hw is None or (size is None and hw != want):
            break
        if size is None:
            plan.append((data, 0, 0))  # no scaling: simplejpeg's defaults
            continue
        try:
            ch, cw, dh, dw = _scaled_size(data, *hw, size)
        except ValueError:
            break
        if (dh, dw) != size:
            break
        plan.append((data, ch, cw))
    decode = simplejpeg.decode_jpeg
    for r, (data, ch, cw) in enumerate(plan):
        try:
            arr = decode(data, colorspace="RGB", min_height=ch, min_width=cw, buffer=rows[r])
        except ValueError:
            return r
        if arr.shape[:2] != want:
            return r
    return len(plan)


def _native_into(data: Buffer, out: np.ndarray) -> np.ndarray | None:
    """A JPEG decoded at its own size into `out`, with no header read first: simplejpeg writes within
    `out` only, refuses an image larger than it, and says what size it decoded. An image of another size
    than `out` raises `SizeMismatch` (a smaller one has been written to the start of `out` by then)."""
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    except ValueError:  # too large for `out`, or not decodable here: the header says which
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        if out.shape[:2] != (h, w):
            raise SizeMismatch((h, w)) from None
        return None
    if arr.shape != out.shape:
        raise SizeMismatch(arr.shape[:2])
    return arr


_SCALED: dict[tuple[int, int, tuple[int, int]], tuple[int, int, int, int]] = {}


def _scaled_size(data: Buffer, h: int, w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(cover height, cover width, decoded height, decoded width) of an h x w JPEG aimed at `size`: the
    size that covers it, and the one libjpeg-turbo's DCT scaling decodes to on the way there. Both depend
    on (h, w, size) only, so a dataset's few image sizes are asked of the decoder once each (a header
    parse per image saved)."""
    got = _SCALED.get((h, w, size))
    if got is None:
        ch, cw = _cover_size(h, w, *size)
        dh, dw, _, _ = simplejpeg.decode_jpeg_header(data, min_height=ch, min_width=cw)
        got = (ch, cw, dh, dw)
        if len(_SCALED) < 4096:
            _SCALED[(h, w, size)] = got
    return got


def _fit(pixels, size: tuple[int, int] | None, crop: str, rnd: int, out: np.ndarray | None) -> np.ndarray:
    """A decoded image (HxWx3 array or Pillow RGB image) resized to cover `size` (Pillow bicubic, only
    when its size differs) and cropped to it, written into `out` or returned as a new writable array."""
    arr = pixels if isinstance(pixels, np.ndarray) else None
    h, w = arr.shape[:2] if arr is not None else (pixels.height, pixels.width)
    if size is not None:
        from PIL import Image

        ch, cw = _cover_size(h, w, *size)
        if (h, w) != (ch, cw):
            img = pixels if arr is None else Image.fromarray(arr)
            arr = np.asarray(img.resize((cw, ch), Image.Resampling.BICUBIC, reducing_gap=None))
        top, left = crop_box(ch, cw, size[0], size[1], crop, rnd)
        h, w = size
    else:
        top = left = 0
    if arr is None:
        arr = np.asarray(pixels)
    view = arr[top : top + h, left : left + w]
    if out is None:
        return np.array(view)  # a writable copy of its own: it becomes a tensor
    if out.shape[:2] != (h, w):
        raise SizeMismatch((h, w))
    out[...] = view
    return out


def to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr)
