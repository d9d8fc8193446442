"""Image bytes to pixels: simplejpeg (libjpeg-turbo with DCT-domain downscaling) where installed,
else Pillow with `draft()`; resize to cover the target, then crop."""

from __future__ import annotations

import io
import math
import re

import numpy as np

from prep.loaders.io.members import Buffer
from prep.loaders.skips import BadSample

try:  # a default dependency; an install without a wheel for this platform still decodes, with Pillow
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    simplejpeg = None


def jpeg_backend() -> str:
    """The JPEG decoder this process uses: 'simplejpeg' when installed, else 'pil'."""
    return "simplejpeg" if simplejpeg is not None else "pil"


def _cover_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """The smallest (h', w') with the aspect of (h, w) that covers (th, tw)."""
    s = max(th / h, tw / w)
    return max(th, math.ceil(h * s - 1e-6)), max(tw, math.ceil(w * s - 1e-6))


def crop_box(h: int, w: int, th: int, tw: int, how: str, rnd: int) -> tuple[int, int]:
    """Top-left corner of a (th, tw) crop of an (h, w) image: centred, or at a seeded random place."""
    if how == "random":
        return (rnd % (h - th + 1)), ((rnd >> 20) % (w - tw + 1))
    return (h - th) // 2, (w - tw) // 2


def pil_rgb(data: Buffer, cover: tuple[int, int, int, int] | None, where: str):
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
    data: Buffer, size: tuple[int, int] | None, crop: str, rnd: int, where: str, out: np.ndarray | None = None
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
            img = pil_rgb(
                data, (*size, 0, 0) if size else None, where
            )  # e.g. CMYK JPEGs: Pillow handles them
    else:
        img = pil_rgb(data, (*size, 0, 0) if size else None, where)
    if size is not None and (img.height, img.width) != size:
        ch, cw = _cover_size(img.height, img.width, *size)
        if (img.height, img.width) != (ch, cw):
            img = img.resize((cw, ch), Image.Resampling.BICUBIC, reducing_gap=None)
        top, left = crop_box(ch, cw, size[0], size[1], crop, rnd)
        img = img.crop((left, top, left + size[1], top + size[0]))
    if out is not None:
        out[...] = np.asarray(img)
        return out
    return np.array(img)  # a writable copy: it becomes a tensor


def to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr)
