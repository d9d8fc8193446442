"""How a decoded image of any mode becomes 8-bit RGB. One rule for the loaders, the encoders and
ingest_local's resize, so that the same file gives the same picture to a model trained on pixels and to
one trained on the latents precache_encodings made of it."""

from __future__ import annotations

from typing import Any

import numpy as np

WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (PNG, TIFF) as Pillow opens it


def eight_bit(img: Any) -> Any:
    """A 16-bit grayscale image as 8-bit 'L' holding each value's high byte, as Pillow itself reads
    16-bit colour PNGs (Pillow's own convert clips 16-bit gray to 255: a nearly white picture); any other
    image unchanged."""
    from PIL import Image

    if img.mode not in WIDE_GRAY:
        return img
    return Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")


def to_rgb(img: Any) -> Any:
    """8-bit RGB, transparency composited on white (as img2dataset does, and as a page shows it: dropping
    the alpha shows whatever colour the transparent pixels hold, often black)."""
    from PIL import Image

    img = eight_bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
