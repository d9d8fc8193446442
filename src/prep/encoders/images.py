"""Image decoding and geometry for image encoders: decode, pick a size (square or aspect bucket),
resize to cover, center crop. Runs in DataLoader workers; returns uint8 HWC arrays so the bytes that
cross process boundaries and the PCIe bus are 4x fewer than float pixels (normalising is on device)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from prep.encoders.spec import DEFAULT_RESOLUTION, EncoderConfig
from prep.formats.pixels import to_rgb

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of `step`, aspect within
    [1/max_aspect, max_aspect] — the SDXL/NovelAI scheme, one bucket per width."""
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    w = step
    while w <= resolution * max_aspect:
        h = max(step, int(area / w) // step * step)
        if 1 / max_aspect <= w / h <= max_aspect:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out, key=lambda wh: (wh[0] / wh[1], wh[0]))


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are even)."""
    target = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - target), -wh[0] * wh[1]))


def target_size(width: int, height: int, cfg: EncoderConfig) -> tuple[int, int]:
    """The (width, height) an image of this size is encoded at."""
    res = cfg.resolution or DEFAULT_RESOLUTION
    if cfg.resize != "buckets":
        return res, res
    buckets = (
        [tuple(b) for b in cfg.buckets] if cfg.buckets else make_buckets(res, cfg.bucket_step, cfg.max_aspect)
    )
    return pick_bucket(width, height, buckets)  # type: ignore[arg-type]


def cover_box(width: int, height: int, tw: int, th: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize size that covers (tw, th) keeping the aspect ratio, and the centered crop box in it."""
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    left, top = (rw - tw) // 2, (rh - th) // 2
    return (rw, rh), (left, top, left + tw, top + th)


def prepare_image(data: bytes, cfg: EncoderConfig) -> np.ndarray:
    """Encoded image bytes -> uint8 array [H, W, 3] at the encoder's size (EXIF rotation applied)."""
    img: Image.Image = Image.open(io.BytesIO(data))
    w, h = img.size
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    tw, th = target_size(w, h, cfg)
    if cfg.resize == "stretch":
        size, box = (tw, th), None
    else:
        size, box = cover_box(w, h, tw, th)
    if cfg.jpeg_draft and img.format == "JPEG":
        need = size if orientation not in (5, 6, 7, 8) else (size[1], size[0])
        img.draft("RGB", need)
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    img = to_rgb(img)
    if img.size != size:
        img = img.resize(size, RESAMPLE[cfg.interpolation])
    if box is not None and box != (0, 0, *size):
        img = img.crop(box)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
