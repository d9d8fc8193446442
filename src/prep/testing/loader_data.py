"""Generated shard folders for loader tests and benchmarks (real tars, `.idx`, manifest.json,
wdinfo.pkl), and the small pieces loader tests share: keyed in-memory leaves, an epoch's planned keys,
a check that a loader is freed without the cyclic GC."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prep.formats.index import write_index
from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.formats.tar_write import write_shard
from prep.formats.wdinfo import write_wdinfo

if TYPE_CHECKING:
    from prep.loaders import SequenceDataset
    from prep.loaders.base import Node


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
        entries.append(ShardEntry(name, n, info.bytes, info.checksum))
        names.append(name)
    if manifest:
        write_manifest(out, Manifest(entries, chunk_size=max(sizes) if sizes else None))
    if wdinfo:
        write_wdinfo(out / "wdinfo.pkl", names, max(sizes), sum(sizes))
    return keys


def keyed_sequence(name: str, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                   **extra: object) -> SequenceDataset:
    """An in-memory leaf for loader-tree tests: rows `{"__key__": f"{name}{i}", "x": tensor([i]), **extra}`
    on one rank, so a test can tell every sample and its source apart."""
    import torch

    from prep.loaders import SequenceDataset

    rows = [{"__key__": f"{name}{i}", "x": torch.tensor([i]), **extra} for i in range(n)]
    return SequenceDataset(rows, batch_size, shuffle=shuffle, seed=seed, world_size=1)


def planned_keys(ds: Node, rank: int = 0, world_size: int = 1) -> list[str]:
    """The keys `rank` gets in one epoch of `ds`, planned and fetched in this process (no DataLoader,
    no workers): the plain order a loader test compares the real loader against."""
    out: list[str] = []
    while True:
        try:
            desc = ds.next_batch()
        except StopIteration:
            return out
        out += ds.fetch(desc, rank, world_size)["__key__"]


def freed_without_gc(make: Callable[[], Iterable[object]]) -> bool:
    """Whether a loader made by `make`, once iterated, is freed by reference counting alone (with the
    cyclic GC off), so its worker processes shut down at once rather than at some later GC pass."""
    import gc
    import weakref

    was_on = gc.isenabled()
    gc.disable()
    try:
        loader = make()
        list(loader)
        ref = weakref.ref(loader)
        del loader
        return ref() is None
    finally:
        if was_on:
            gc.enable()
