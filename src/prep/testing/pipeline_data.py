"""Data for pipeline tests and the example pipeline: the folders `configs/pipelines/example.yaml`
reads under DATA_ROOT (two image folders with captions, WebDataset tars, prep shard folders), small."""

from __future__ import annotations

from pathlib import Path

from prep.testing.loader_data import jpeg_bytes, make_shards


def image_folder(folder: str | Path, n: int, *, size: int = 8, prefix: str = "im") -> tuple[Path, Path]:
    """`n` JPEGs in `folder/images` and `folder/captions.txt` (NAME<TAB>CAPTION); returns both paths."""
    root = Path(folder)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{prefix}{i:04d}.jpg"
        (images / name).write_bytes(jpeg_bytes(i, size))
        lines.append(f"{name}\ta picture number {i}")
    captions = root / "captions.txt"
    captions.write_text("\n".join(lines) + "\n", "utf-8")
    return images, captions


def example_data(root: str | Path) -> Path:
    """Everything the example pipeline names, under `root` (pass it as DATA_ROOT)."""
    out = Path(root)
    image_folder(out / "256", 12)
    image_folder(out / "1024", 6)
    make_shards(out / "laion", [5, 5, 4], image_size=8, distinct_images=2)
    make_shards(out / "art", [6, 6], image_size=8, distinct_images=2)
    make_shards(out / "val", [4], image_size=8, distinct_images=1)
    return out
