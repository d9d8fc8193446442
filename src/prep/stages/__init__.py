"""The stages, in pipeline order (ingest_local is the road for data already on disk, beside the two
downloads). Each is a module with the shape described in `stages.base`."""

from __future__ import annotations

import importlib
from types import ModuleType

from prep.errors import PrepError

STAGE_ORDER: tuple[str, ...] = (
    "download_parquet",
    "download_images",
    "ingest_local",
    "reorganize_tar",
    "precache_encodings",
    "merge_source_tar",
    "generate_wdinfo",
)


def get_stage(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise PrepError(f"unknown stage {name!r}", "command line",
                        f"use one of: {', '.join(STAGE_ORDER)} (or `all`); `prep stages` lists them")
    return importlib.import_module(f"prep.stages.{name}")
