"""Images are decoded straight into the batch (a shared-memory slot in a worker) with the same pixels as
the reference decode: simplejpeg (= Pillow's libjpeg-turbo) at its DCT scale, Pillow bicubic resize to
cover, crop; PNG/WebP through Pillow. Batches are Bx3xHxW in channels_last memory in every image mode."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import simplejpeg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prep.errors import PrepError
from prep.formats.index import write_index
from prep.formats.tar_write import write_shard
from prep.loaders import DataLoader, ShardDataset
from prep.loaders.io import decode, images
from prep.loaders.io.images import SizeMismatch, crop_box, decode_image


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, seed * 40)], -1)
    return np.clip(base + rng.normal(0, 9, base.shape), 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _cover(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    s = max(th / h, tw / w)
    return max(th, int(np.ceil(h * s - 1e-6))), max(tw, int(np.ceil(w * s - 1e-6)))


def _reference(data: bytes, size: tuple[int, int] | None, crop: str, rnd: int) -> np.ndarray:
    """The plain decode, step by step: JPEGs by simplejpeg at the DCT scale that still covers the target,
    everything else by Pillow; Pillow bicubic resize to cover; Pillow crop."""
    if data[:2] == b"\xff\xd8":
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        ch, cw = _cover(h, w, *size) if size else (0, 0)
        img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=ch, min_width=cw))
    else:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is None:
        return np.asarray(img)
    ch, cw = _cover(img.height, img.width, *size)
    if (img.height, img.width) != (ch, cw):
        img = img.resize((cw, ch), Image.Resampling.BICUBIC, reducing_gap=None)
    top, left = crop_box(ch, cw, *size, crop, rnd)
    return np.asarray(img.crop((left, top, left + size[1], top + size[0])))


# (source H, W), target: native, same, DCT-exact 1/2 and 7/8, DCT then resize, crop only, upscale, non-square
CASES = [
    ((256, 256), None), ((256, 256), (256, 256)), ((256, 256), (128, 128)), ((256, 256), (224, 224)),
    ((256, 256), (200, 200)), ((240, 320), (240, 240)), ((240, 320), (120, 100)), ((64, 48), (100, 90)),
    ((256, 256), (96, 160)),
]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(("src", "size"), CASES)
@pytest.mark.parametrize("crop", ["center", "random"])
def test_decode_into_a_batch_row_equals_the_reference(src, size, crop, fmt):
    data = _encode(_photo(*src, seed=1), fmt, **({"quality": 90} if fmt == "JPEG" else {"lossless": True}
                                                 if fmt == "WEBP" else {}))
    rnd = 987_654_321 if crop == "random" else 0
    want = _reference(data, size, crop, rnd)
    assert want.shape == ((*src, 3) if size is None else (*size, 3))
    if fmt == "JPEG":  # simplejpeg and Pillow's libjpeg-turbo agree on a plain decode
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(simplejpeg.decode_jpeg(data), pil)
    assert np.array_equal(decode_image(data, size, crop, rnd, "x"), want)
    rows = np.full((3, *want.shape), 7, dtype=np.uint8)
    got = decode_image(data, size, crop, rnd, "x", out=rows[1])
    assert np.shares_memory(got, rows[1]) and np.array_equal(rows[1], want)
    assert (rows[0] == 7).all() and (rows[2] == 7).all()  # nothing written outside its row


def test_a_jpeg_at_the_target_size_decodes_in_place_without_a_resize(monkeypatch):
    data = _encode(_photo(256, 256, 2), "JPEG", quality=90)
    want = _reference(data, (128, 128), "center", 0)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized"))
    monkeypatch.setattr(Image, "fromarray", lambda *a, **k: pytest.fail("went through Pillow"))
    out = np.empty((128, 128, 3), np.uint8)
    decode_image(data, (128, 128), "center", 0, "x", out=out)  # 1/2 DCT scale is exactly the target
    decode_image(data, (224, 224), "center", 0, "x", out=np.empty((224, 224, 3), np.uint8))  # 7/8
    assert np.array_equal(out, want)


def test_native_size_into_a_row_of_another_size_says_so(monkeypatch):
    data = _encode(_photo(32, 48, 3), "JPEG")
    with pytest.raises(SizeMismatch) as err:
        decode_image(data, None, "center", 0, "x", out=np.empty((32, 32, 3), np.uint8))
    assert err.value.got == (32, 48)
    monkeypatch.setattr(images, "simplejpeg", None)  # the Pillow path checks too
    with pytest.raises(SizeMismatch):
        decode_image(data, None, "center", 0, "x", out=np.empty((32, 32, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One shard of 12 samples: JPEG, PNG and WebP images of the same size, and one corrupt image."""
    folder = tmp_path_factory.mktemp("mixed")
    rows, pixels = [], {}
    for i in range(12):
        arr = _photo(40, 56, i)
        fmt = ["JPEG", "PNG", "WEBP"][i % 3]
        data = _encode(arr, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        if i == 4:  # the first of the second batch (in order)
            data = b"\xff\xd8 not a jpeg"
        rows.append((f"k{i:03d}", {"img": data, "txt": f"caption {i}".encode()}))
        pixels[f"k{i:03d}"] = data
    info = write_shard(folder / "a.tar", rows, fsync=False)
    write_index(folder / "a.tar", info.offsets)
    return folder, pixels


def _mixed_dataset(folder, **kw) -> ShardDataset:
    return ShardDataset(folder, batch_size=4, seed=1, max_skip_fraction=0.5, **kw)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("size", [None, 32])
def test_batches_hold_the_reference_pixels_in_channels_last(mixed, workers, size):
    folder, data = mixed
    seen = 0
    ds = _mixed_dataset(folder, shuffle=False, image_size=size)
    for batch in DataLoader(ds, num_workers=workers):
        x = batch["img"]
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert "k004" not in batch["__key__"]  # the corrupt image is skipped, even as a batch's first
        for key, img, txt in zip(batch["__key__"], x, batch["txt"], strict=True):
            want = _reference(data[key], (size, size) if size else None, "center", 0)
            assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(np.array(want))), key
            assert txt == f"caption {int(key[1:])}"
            seen += 1
    assert seen == 11


def test_a_transform_keeps_the_channels_last_layout_and_the_pixels(mixed):
    folder, _ = mixed
    plain = list(DataLoader(_mixed_dataset(folder)))
    hooked = list(DataLoader(_mixed_dataset(folder, transform=lambda s: s)))
    for a, b in zip(plain, hooked, strict=True):
        assert b["img"].is_contiguous(memory_format=torch.channels_last) and torch.equal(a["img"], b["img"])


def test_native_sizes_that_differ_in_a_batch_are_an_error_naming_both(tmp_path):
    rows = [(f"k{i}", {"jpg": _encode(_photo(16, 16 + 8 * (i == 2), i), "JPEG")}) for i in range(4)]
    info = write_shard(tmp_path / "a.tar", rows, fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    shapes = r"\[\(3, 16, 16\), \(3, 16, 24\)\]"
    with pytest.raises(PrepError, match=r"'jpg' has different shapes in one batch: " + shapes):
        list(DataLoader(ShardDataset(tmp_path, batch_size=4, shuffle=False)))
    ok = list(DataLoader(ShardDataset(tmp_path, batch_size=4, shuffle=False, image_size=16)))
    assert ok[0]["jpg"].shape == (4, 3, 16, 16)


def test_float_batches_are_the_uint8_pixels_over_255(mixed):
    folder, _ = mixed
    u8 = list(DataLoader(_mixed_dataset(folder), num_workers=1))
    f32 = list(DataLoader(_mixed_dataset(folder, decode="float"), num_workers=1))
    for a, b in zip(u8, f32, strict=True):
        assert b["img"].dtype == torch.float32 and torch.equal(a["img"].float() / 255, b["img"])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_first_image_whose_header_reads_but_whose_data_does_not_leaves_the_shape_to_the_next(
        tmp_path, workers):
    """At native size a batch's rows are sized from its first image's header; if that image then fails
    to decode, it is skipped and the next good image sets the shape, as if the header had not been read."""
    cut = _encode(_photo(64, 64, 9), "JPEG")
    cut = cut[: cut.index(b"\xff\xda") + 20]  # frame header intact, image data cut
    assert images.jpeg_size(cut) == (64, 64)
    good = {f"k{i}": _encode(_photo(40, 56, i), "JPEG") for i in range(1, 4)}
    rows = [("k0", {"jpg": cut})] + [(k, {"jpg": v}) for k, v in good.items()]
    info = write_shard(tmp_path / "a.tar", rows, fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    ds = ShardDataset(tmp_path, batch_size=4, shuffle=False, max_skip_fraction=0.5)
    loader = DataLoader(ds, num_workers=workers)
    (batch,) = list(loader)
    assert batch["__key__"] == ["k1", "k2", "k3"] and batch["jpg"].shape == (3, 3, 40, 56)
    for key, img in zip(batch["__key__"], batch["jpg"], strict=True):
        assert np.array_equal(img.permute(1, 2, 0).numpy(), _reference(good[key], None, "center", 0))
    assert loader.stats()["by_reason"] == {"corrupt image": 1}


def test_a_smaller_native_jpeg_than_its_row_is_a_size_mismatch_and_stays_in_its_row():
    data = _encode(_photo(16, 24, 4), "JPEG")
    rows = np.full((3, 32, 32, 3), 7, dtype=np.uint8)
    with pytest.raises(SizeMismatch) as err:
        decode_image(data, None, "center", 0, "x", out=rows[1])
    assert err.value.got == (16, 24)
    assert (rows[0] == 7).all() and (rows[2] == 7).all()


@pytest.mark.parametrize("size", [None, 64, 50])
@pytest.mark.parametrize("bad", [None, 0, 3, 7])
def test_a_batch_of_jpegs_decodes_in_one_run_up_to_a_bad_one_and_per_sample_after(
        tmp_path, size, bad, monkeypatch):
    """All-JPEG batches take the one-run loop (straight into the rows); at a corrupt image (first, middle
    or last) the per-sample loop takes over at that row: the same samples, rows and pixels either way.
    Sizes: native, a DCT-exact 1/2, and one that needs a resize (per sample throughout)."""
    images._SCALED.clear()
    runs: list[int] = []
    real_run = decode.decode_jpeg_run
    monkeypatch.setattr(decode, "decode_jpeg_run", lambda *a: runs.append(real_run(*a)) or runs[-1])
    data = {f"k{i}": _encode(_photo(128, 128, i), "JPEG", quality=85) for i in range(8)}
    if bad is not None:
        data[f"k{bad}"] = data[f"k{bad}"][:700]  # its header reads, its image data is cut
    rows = [(k, {"jpg": v, "txt": k.encode()}) for k, v in data.items()]
    info = write_shard(tmp_path / "a.tar", rows, fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    ds = ShardDataset(tmp_path, batch_size=8, shuffle=False, image_size=size, max_skip_fraction=0.5)
    (batch,) = list(DataLoader(ds))
    keys = [k for k in data if k != f"k{bad}"]
    assert batch["__key__"] == keys and batch["txt"] == keys
    assert batch["jpg"].is_contiguous(memory_format=torch.channels_last)
    for key, img in zip(keys, batch["jpg"], strict=True):
        want = _reference(data[key], (size, size) if size else None, "center", 0)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want), key
    in_run = 0 if size == 50 else 8 if bad is None else bad
    # how many the one run decoded (a first image that fails: none); a batch the plain path gives up on
    # is decoded again by the per-sample path, whose run stops at the same image
    assert runs and all(r == in_run for r in runs) and len(runs) == (1 if bad is None and size != 50 else 2)


# ------------------------------------------------------------------------------------ the plain path
_TEXTS = st.one_of(st.text(max_size=12).map(lambda t: t.encode()), st.binary(max_size=12))
_JSONS = st.one_of(
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=6).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b" {}", b"{} ", b"[1]\n", b"\xef\xbb\xbf{}", b"{", b"", b"1", b"2.5", b'"\xff"']),
)


def _batches_both_ways(ds, monkeypatch):
    """Each batch through the plain path (C columns), then through the per-sample path alone, with the
    loaders' skip counts."""
    first = DataLoader(ds)
    got = list(first)
    with monkeypatch.context() as m:
        m.setattr(decode, "_BATCH_COLUMNS", None)
        ds.set_epoch(0)
        second = DataLoader(ds)
        want = list(second)
    return got, want, first.stats(), second.stats()


@pytest.mark.skipif(decode._BATCH_COLUMNS is None, reason="the C helper was not built")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXTS, min_size=6, max_size=6), jsons=st.lists(_JSONS, min_size=6, max_size=6),
       order=st.sampled_from([("jpg", "txt", "json"), ("json", "jpg", "txt"), ("txt", "json", "jpg")]),
       size=st.sampled_from([None, 32]), mode=st.sampled_from(["uint8", "float"]))
def test_the_plain_path_gives_the_per_sample_paths_batches(tmp_path_factory, monkeypatch, texts, jsons, order,
                                                          size, mode):
    """Whatever the members hold (undecodable text, JSON with whitespace, a BOM, bad JSON, bare numbers
    that stack into a tensor), a batch from the C columns equals the per-sample path's: the same keys,
    values, value types, field order and pixels, and the same samples skipped."""
    tmp = tmp_path_factory.mktemp("plain")
    jpg = {i: _encode(_photo(64, 64, i), "JPEG", quality=85) for i in range(6)}
    rows = []
    for i in range(6):
        members = {"jpg": jpg[i], "txt": texts[i], "json": jsons[i]}
        rows.append((f"k{i}", {m: members[m] for m in order}))
    info = write_shard(tmp / "a.tar", rows, fsync=False)
    write_index(tmp / "a.tar", info.offsets)
    ds = ShardDataset(tmp, batch_size=3, shuffle=False, image_size=size, decode=mode, max_skip_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want, got_skips, want_skips = _batches_both_ways(ds, monkeypatch)
    assert got_skips == want_skips and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b)  # field order
        for name in a:
            if isinstance(b[name], torch.Tensor):
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
                assert a[name].stride() == b[name].stride(), name
            else:
                assert type(a[name]) is type(b[name]) and a[name] == b[name], name


@pytest.mark.skipif(decode._BATCH_COLUMNS is None, reason="the C helper was not built")
def test_plain_batches_are_built_without_the_per_sample_path(tmp_path, monkeypatch):
    """The common batch (JPEG + caption + JSON, nothing wrong) never reaches the per-sample path."""
    rows = [(f"k{i}", {"jpg": _encode(_photo(48, 48, i), "JPEG"), "txt": b"a cat", "json": b'{"w": 48}'})
            for i in range(4)]
    info = write_shard(tmp_path / "a.tar", rows, fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    calls: list[int] = []
    real = decode.Decoder.decode_batch
    monkeypatch.setattr(decode.Decoder, "decode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    (batch,) = list(DataLoader(ShardDataset(tmp_path, batch_size=4, shuffle=False)))
    assert calls == [] and batch["txt"] == ["a cat"] * 4 and batch["json"] == [{"w": 48}] * 4
    assert batch["jpg"].shape == (4, 3, 48, 48)


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of `values` (uint16: H x W gray, or H x W x 2 gray + alpha, 3 RGB, 4 RGBA), written by
    hand: Pillow writes 16-bit gray only."""
    import struct
    import zlib

    color_type = {0: 0, 2: 4, 3: 2, 4: 6}[values.shape[-1] if values.ndim == 3 else 0]
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("channels", [0, 2, 3, 4])
@pytest.mark.parametrize("decode_as", ["uint8", "float", "pil"])
def test_16_bit_pngs_decode_to_the_high_byte_of_each_value(tmp_path, channels, decode_as):
    """A 16-bit PNG (gray, gray + alpha, RGB, RGBA) gives each value's high byte, as Pillow reads 16-bit
    color, transparency on white: Pillow's convert('RGB') clipped 16-bit gray to 255, a nearly white
    image."""
    from PIL import Image

    rng = np.random.default_rng(channels)
    shape = (6, 7) if channels == 0 else (6, 7, channels)
    values = [rng.integers(0, 2**16, shape, dtype=np.uint16) for _ in range(4)]
    info = write_shard(tmp_path / "a.tar", [(f"k{i}", {"png": _png16(v)}) for i, v in enumerate(values)],
                       fsync=False)
    write_index(tmp_path / "a.tar", info.offsets)
    batch = next(iter(DataLoader(ShardDataset(tmp_path, batch_size=4, shuffle=False, decode=decode_as))))
    for got, v in zip(batch["png"], values, strict=True):
        high = (v >> 8).astype(np.uint8)
        gray = v.ndim == 2 or v.shape[-1] == 2
        want = np.repeat((high if v.ndim == 2 else high[..., 0])[..., None], 3, -1) if gray else high[..., :3]
        if channels in (2, 4):  # composited on white, as precache's image reader and img2dataset do
            rgba = Image.fromarray(np.concatenate([want, high[..., -1:]], -1), "RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            want = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        pixels = np.asarray(got) if decode_as == "pil" else got.permute(1, 2, 0).numpy()
        if decode_as == "float":
            pixels = (pixels * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(pixels, want)
