"""Pipeline checkpoints: one file each, written atomically, read without unpickling arbitrary objects.

A checkpoint is a `torch.save` of plain containers, tensors and numbers only (module, optimizer,
scheduler, scaler, EMA and trainer states; RNG states converted to tensors and lists), plus two JSON
strings: the run's metadata and the loader states. Loading uses `torch.load(weights_only=True)`, so a
file carrying a crafted pickle (a `__reduce__` that runs code) is refused before anything executes.

Names: `ckpt-<batches trained, 12 digits>.pt`; the last one of each step is also kept as
`step-<index>-<batches>-<name>.pt`. Writing goes to a temp name in the same folder, fsync, rename: a
kill at any moment leaves the previous checkpoints intact and, at worst, a temp file that the next run
removes.
Only the newest `keep_last` regular checkpoints are kept (step ends are never pruned).
A run holds `.lock` in its folder (`fcntl.flock`: a killed holder releases it) for as long as it runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

from prep.errors import PrepError

FORMAT = "prep.pipeline/1"
_CKPT = re.compile(r"^ckpt-(\d{12})\.pt$")
_STEP_END = re.compile(r"^step-(\d{3})-(\d{12})-.*\.pt$")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(folder: Path, name: str, payload: dict[str, Any]) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(payload, tmp)  # by path: torch's own writer (a Python file object is slower)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return folder / name


def regular_name(batches: int) -> str:
    return f"ckpt-{batches:012d}.pt"


def step_end_name(index: int, batches: int, step: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", step)[:60]
    return f"step-{index:03d}-{batches:012d}-{safe}.pt"


def prune(folder: Path, keep_last: int) -> None:
    regular = sorted(p for p in folder.iterdir() if _CKPT.match(p.name))
    for p in regular[: max(0, len(regular) - keep_last)]:
        p.unlink(missing_ok=True)


LOCK_NAME = ".lock"


def hold(folder: Path) -> tuple[int | None, str | None]:
    """Lock the folder for one run: (descriptor to keep open, None), or (None, who holds it). Two runs
    in one folder would delete each other's temp files (a crash at its next save) and prune each
    other's checkpoints; a torchrun killed with SIGKILL leaves its workers running (torchrun starts
    them in sessions of their own), so a re-run would race them. A filesystem without flock locks
    nothing: (None, None)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, (holder if err.errno in (errno.EAGAIN, errno.EACCES) else None)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd, None


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def remove_temps(folder: Path) -> None:
    """Temp files left by a run killed while writing (never a checkpoint: those are renamed whole)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _ranked(folder: Path) -> list[tuple[int, int, str]]:
    """(batches trained, 1 for a step end else 0, name) of every checkpoint in `folder`."""
    if not folder.is_dir():
        return []
    found: list[tuple[int, int, str]] = []
    for p in folder.iterdir():
        if m := _CKPT.match(p.name):
            found.append((int(m.group(1)), 0, p.name))
        elif m := _STEP_END.match(p.name):
            found.append((int(m.group(2)), 1, p.name))
    return sorted(found)


def newest(folder: Path) -> Path | None:
    """The checkpoint with the most batches trained (a step end beats a regular one of the same count)."""
    found = _ranked(folder)
    return folder / found[-1][2] if found else None


def past(folder: Path, batches: int) -> list[str]:
    """Names of the checkpoints in `folder` with more than `batches` batches trained, oldest first."""
    return [name for n, _, name in _ranked(folder) if n > batches]


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`); anything else is refused, naming the file."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PrepError("checkpoint not found", str(path), "check the --resume path") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PrepError(
            f"not a safe pipeline checkpoint; it was not loaded ({first})",
            str(path),
            "delete or move the file (it may have been tampered with), or pass --resume "
            "with another checkpoint",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PrepError(
            "not a prep pipeline checkpoint", str(path), "pass a file written by prep pipeline run"
        )
    return payload


def optimizer_state_by_name(
    state: dict[str, Any], saved: list[list[str]], now: list[list[str]]
) -> dict[str, Any]:
    """An optimizer's saved `state_dict` re-indexed for the parameters it has now (`now`, by
    module.parameter name and group; `saved`: the names it was saved with). torch matches saved state
    to parameters by position, so a parameter added or no longer trained would shift every later one's
    moments onto the wrong tensor. Parameters both have keep their state; new ones start fresh."""
    if len(saved) != len(now) or len(state["param_groups"]) != len(now):
        raise ValueError(f"{len(saved)} parameter groups saved, {len(now)} now")
    by_name = {
        name: state["state"][index]
        for group, names in zip(state["param_groups"], saved, strict=True)
        for index, name in zip(group["params"], names, strict=True)
        if index in state["state"]
    }
    groups, states, index = [], {}, 0
    for group, names in zip(state["param_groups"], now, strict=True):
        params = []
        for name in names:
            if name in by_name:
                states[index] = by_name[name]
            params.append(index)
            index += 1
        groups.append({**group, "params": params})
    return {"state": states, "param_groups": groups}
