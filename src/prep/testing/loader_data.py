"""Generated shard folders for loader tests and benchmarks: real tars, `.idx`, manifest.json, wdinfo.pkl."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prep.formats.checksum import file_checksum
from prep.formats.index import write_index
from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.formats.tar import write_shard
from prep.formats.wdinfo import write_wdinfo


def jpeg_bytes(seed: int, size: int = 16, quality: int = 90, noise: float = 12.0) -> bytes:
    """A deterministic noisy-gradient JPEG of size x size (compresses like a photo, unlike pure noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack(
        [(xx * 255 // max(1, size - 1)), (yy * 255 // max(1, size - 1)), np.full_like(xx, seed % 256)],
        axis=-1,
    )
    arr = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_shards(
    folder: str | Path,
    sizes: Sequence[int],
    *,
    image_size: int = 16,
    quality: int = 90,
    index: bool = True,
    manifest: bool = True,
    wdinfo: bool = False,
    npy: bool = False,
    distinct_images: int = 8,
    prefix: str = "shard",
) -> list[str]:
    """Write len(sizes) shards (jpg, txt, json members; `.npy` too when asked) and return all keys in
    shard order. Keys are `s{shard:05d}_{row:06d}`; images cycle through `distinct_images` JPEGs."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    images = [jpeg_bytes(i, image_size, quality) for i in range(max(1, distinct_images))]
    keys: list[str] = []
    entries: list[ShardEntry] = []
    names: list[str] = []
    for s, n in enumerate(sizes):
        samples = []
        for r in range(n):
            key = f"s{s:05d}_{r:06d}"
            members: dict[str, bytes] = {
                "jpg": images[(s * 7 + r) % len(images)],
                "txt": f"caption {key}\twith a tab".encode(),
                "json": json.dumps({"key": key, "shard": s, "row": r}).encode(),
            }
            if npy:
                buf = io.BytesIO()
                np.save(buf, np.full((4,), s * 1000 + r, dtype=np.float32), allow_pickle=False)
                members["npy"] = buf.getvalue()
            samples.append((key, members))
            keys.append(key)
        name = f"{prefix}-{s:05d}.tar"
        info = write_shard(out / name, samples, fsync=False)
        if index:
            write_index(out / name, info.offsets)
        entries.append(ShardEntry(name, n, info.bytes, file_checksum(out / name)))
        names.append(name)
    if manifest:
        write_manifest(out, Manifest(entries, chunk_size=max(sizes) if sizes else None))
    if wdinfo:
        write_wdinfo(out / "wdinfo.pkl", names, max(sizes), sum(sizes))
    return keys
