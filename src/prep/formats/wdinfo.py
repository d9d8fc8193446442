"""`wdinfo.pkl`: NeMo's exact dict `{tar_files, chunk_size, total_key_count}`.

Written for NeMo's loader. Reading unpickles, so prep reads it only where the user asks, and then
with an unpickler that accepts nothing but plain containers.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

from prep.errors import PrepError
from prep.formats.atomic import write_bytes_atomic
from prep.formats.dataset_path import check_dataset_path


def wdinfo_dict(tar_files: Sequence[str], chunk_size: int, total_key_count: int) -> dict:
    return {
        "tar_files": sorted(tar_files),
        "chunk_size": int(chunk_size),
        "total_key_count": int(total_key_count),
    }


def write_wdinfo(path: str | os.PathLike[str], tar_files: Sequence[str], chunk_size: int,
                 total_key_count: int) -> dict:
    info = wdinfo_dict(tar_files, chunk_size, total_key_count)
    write_bytes_atomic(path, pickle.dumps(info, protocol=4))
    return info


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # no classes at all: dicts, lists, str, int only
        raise pickle.UnpicklingError(f"wdinfo.pkl refers to {module}.{name}; only plain data is allowed")


def read_wdinfo(path: str | os.PathLike[str]) -> dict:
    """Load a wdinfo.pkl safely (no class may be loaded) and check NeMo's keys and types, and that every
    shard it lists stays inside its folder (the rule manifest.json follows)."""
    p = Path(path)
    try:
        info = _PlainUnpickler(io.BytesIO(p.read_bytes())).load()
    except FileNotFoundError:
        raise PrepError("wdinfo.pkl not found", str(p), "check the path") from None
    except OSError as err:
        raise PrepError(f"cannot read wdinfo.pkl ({err.strerror or err})", str(p), "check the path") from None
    except Exception as err:  # any malformed pickle: the bytes are untrusted, so every failure is the user's
        raise PrepError(f"not a plain wdinfo.pkl ({type(err).__name__}: {err})", str(p),
                        "regenerate it with `prep run generate_wdinfo`") from None
    ok = (isinstance(info, dict) and isinstance(info.get("tar_files"), list)
          and all(isinstance(t, str) for t in info["tar_files"])
          and isinstance(info.get("chunk_size"), int) and isinstance(info.get("total_key_count"), int))
    if not ok:
        raise PrepError("wdinfo.pkl lacks NeMo's keys tar_files (list of str), chunk_size and "
                        "total_key_count (int)", str(p), "regenerate it with generate_wdinfo")
    for t in info["tar_files"]:
        check_dataset_path(t, "tar_files path", str(p),
                           "list shards relative to wdinfo.pkl's folder (regenerate it with generate_wdinfo)")
    return info
