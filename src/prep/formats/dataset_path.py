"""The one rule for shard paths that dataset metadata lists (manifest.json, wdinfo.pkl): relative to the
metadata's folder, and never leaving it. The files are data, not trusted: a `../` or absolute path there
would make a loader read whatever it names."""

from __future__ import annotations

import re

from prep.errors import PrepError

_DRIVE_RE = re.compile(r"[A-Za-z]:")  # a Windows drive: absolute there


def check_dataset_path(path: str, what: str, where: str, fix: str) -> str:
    """`path` unchanged when it stays inside the dataset folder, else a PrepError naming it: empty,
    absolute (`/x`, `\\x`, `C:x`) or with a `..` component (either separator)."""
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith(("/", "\\")) or _DRIVE_RE.match(path) or ".." in parts:
        raise PrepError(f"{what} {path!r} leaves the dataset folder", where, fix)
    return path
