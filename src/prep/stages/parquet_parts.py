"""Parquet parts and raw tars as the download stages lay them out (img2dataset's layout), shared by
download_parquet, download_images and ingest_local."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prep.errors import PrepError
from prep.formats.atomic import temp_name


@contextmanager
def reading_parquet(path: str | os.PathLike[str], fix: str) -> Iterator[None]:
    """pyarrow's error for a file that is no parquet (or a cut one), as one line naming the file."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise PrepError(f"not a readable parquet file ({str(err).splitlines()[0]})", str(path), fix) from None


NOT_A_PART = ("replace it with a real parquet file (re-run download_parquet with --force), or move it out of "
              "download_images.input_dir")


def read_columns(path: str | os.PathLike[str], fix: str = NOT_A_PART, shown: str | None = None) -> list[str]:
    """Column names of a parquet file (reads the footer only); errors name it as `shown` (a URL
    without its signature) when given."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(str(path), "rb") as f, reading_parquet(shown or path, fix):
        return pq.read_schema(f).names


def check_columns(names: list[str], required: list[str], where: str) -> None:
    """Fail before any image is fetched when a column the download needs is absent."""
    missing = [c for c in required if c not in names]
    if missing:
        raise PrepError(f"column(s) {', '.join(map(repr, missing))} not found; the file has: "
                        f"{', '.join(map(repr, names))}", where,
                        "set download_images.url_col / caption_col (LAION uses URL and TEXT) or fix "
                        "save_additional_columns to name existing columns")


def key_prefix(part: str) -> str:
    """A part's key prefix: its name with anything but [A-Za-z0-9_-] as '_' (a key holds no dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", part)


def shard_name(shard: int, digits: int) -> str:
    return f"{shard:0{digits}d}"


def other_parts_warning(out: Path, parts: set[str]) -> list[str]:
    """A warning naming the folders of `out` that hold tars but are none of this plan's `parts` (an
    earlier plan's part since removed or renamed, or another writer's), or [] when there are none."""
    others = sorted(d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
                    and d.name not in parts and any(d.glob("*.tar")))
    if not others:
        return []
    return [f"WARNING: {out} also holds tars in {', '.join(others)}, which this plan did not write; "
            "reorganize_tar reads them too: remove them if they are stale"]


def load_img2dataset():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would try the network
    import img2dataset

    return img2dataset


def write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = temp_name(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
