"""One rule turns a decoded image of any mode into 8-bit RGB (`formats.pixels.to_rgb`): the loaders and
precache_encodings' image reader give the same picture of the same file, so a model trained on pixels
and one trained on the latents of those pixels see one image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prep.encoders.images import prepare_image
from prep.encoders.spec import EncoderConfig
from prep.formats.index import write_index
from prep.formats.pixels import to_rgb
from prep.formats.tar_write import write_shard
from prep.loaders import DataLoader, ShardDataset

SIDE = 16


def _image(mode: str, seed: int) -> bytes:
    """A PNG (or TIFF for 16-bit gray) of random pixels in `mode`, with partly transparent pixels where
    the mode can hold them."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 2**16, (SIDE, SIDE), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).quantize(16)
        img.info["transparency"] = 3
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.integers(0, 256, (SIDE, SIDE, bands), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode == "I;16" else "PNG", **({"transparency": 3} if mode == "P" else {}))
    return buf.getvalue()


MODES = ["RGB", "RGBA", "L", "LA", "P", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_transparency_is_on_white_and_16_bit_gray_keeps_its_tones(mode: str) -> None:
    data = _image(mode, 1)
    img = Image.open(io.BytesIO(data))
    got = np.asarray(to_rgb(img)).astype(int)
    assert got.shape == (SIDE, SIDE, 3)
    rgba = np.asarray(img.convert("RGBA")).astype(int) if mode != "I;16" else None
    if mode == "I;16":  # the high byte of each value, not Pillow's clip to 255
        want = (np.asarray(img).astype(int) >> 8)[..., None].repeat(3, -1)
        np.testing.assert_array_equal(got, want)
    else:
        assert rgba is not None
        alpha = rgba[..., 3:] / 255
        want_f = rgba[..., :3] * alpha + 255 * (1 - alpha)  # over white
        assert np.abs(got - want_f).max() <= 1
        if (rgba[..., 3] == 0).any():  # a fully transparent pixel is white, whatever colour it held
            assert (got[rgba[..., 3] == 0] == 255).all()


def test_loader_and_precache_see_the_same_picture_of_every_file(tmp_path) -> None:
    files = [_image(m, i) for i, m in enumerate(MODES)]
    ext = ["tiff" if m == "I;16" else "png" for m in MODES]
    info = write_shard(tmp_path / "a.tar", [(f"k{i}", {e: d}) for i, (e, d) in enumerate(zip(ext, files,
                       strict=True))], fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    loaded = list(DataLoader(ShardDataset(tmp_path, batch_size=1, shuffle=False, decode="uint8")))
    cfg = EncoderConfig(key="v", modality="image", model="m:f", resolution=SIDE)
    for sample, data, mode in zip(loaded, files, MODES, strict=True):
        pixels = next(v for k, v in sample.items() if k in ("png", "tiff"))[0]
        np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), prepare_image(data, cfg),
                                      err_msg=mode)
