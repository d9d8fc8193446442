"""prep's optional C helpers for tars (`_tarnative.c`), loaded once: None where they were not built."""

from __future__ import annotations

import importlib
from types import ModuleType


def _native() -> ModuleType | None:
    """The C helpers (`_tarnative.c`: `scan`, `layout`, `fill_members`), where they were built at install
    (a C compiler present); else None, and the Python versions serve."""
    try:
        return importlib.import_module("prep.formats._tarnative")
    except ImportError:
        return None


NATIVE = _native()
