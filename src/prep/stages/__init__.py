"""The stages, in pipeline order (ingest_local is the road for data already on disk, beside the two
downloads). Each is a module with the shape described in `stages.base`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from prep.errors import PrepError
from prep.stages.base import StageModule

STAGE_ORDER: tuple[str, ...] = (
    "download_parquet",
    "download_images",
    "ingest_local",
    "reorganize_tar",
    "precache_encodings",
    "merge_source_tar",
    "generate_wdinfo",
)


def get_stage(name: str) -> StageModule:
    """The stage module of that name (imported on first use: `prep --help` loads no stage)."""
    if name not in STAGE_ORDER:
        raise PrepError(f"unknown stage {name!r}", "command line",
                        f"use one of: {', '.join(STAGE_ORDER)} (or `all`); `prep stages` lists them")
    return cast(StageModule, importlib.import_module(f"prep.stages.{name}"))


if TYPE_CHECKING:  # the type checker holds every stage module to the protocol
    from prep.stages import (
        download_images,
        download_parquet,
        generate_wdinfo,
        ingest_local,
        merge_source_tar,
        precache_encodings,
        reorganize_tar,
    )

    _CHECKED: tuple[StageModule, ...] = (download_parquet, download_images, ingest_local, reorganize_tar,
                                         precache_encodings, merge_source_tar, generate_wdinfo)
