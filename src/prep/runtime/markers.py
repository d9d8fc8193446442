"""Done-markers: one JSON file per finished task, holding its fingerprint, its outputs' sizes and
checksums, and its result. A re-run skips a task only when all of that still matches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prep.formats.atomic import write_text_atomic
from prep.formats.checksum import file_checksum, file_matches
from prep.stages.base import Task, TaskResult, legacy_marker_file, marker_file, recorded_marker_file

MARKER_DIR = ".prep/done"


def marker_path(marker_dir: Path, task: Task) -> Path:
    """One file per task id (`stages.base.marker_file`: distinct ids, distinct files)."""
    return marker_file(marker_dir, task.id)


def describe_outputs(paths: tuple[str, ...], known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{path: {bytes, checksum}} for every output, hashing only those the task did not already hash."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        if p in known and "checksum" in known[p]:
            out[p] = {"bytes": int(known[p]["bytes"]), "checksum": known[p]["checksum"]}
        else:
            out[p] = {"bytes": os.path.getsize(p), "checksum": file_checksum(p)}
    return out


REWRITTEN = ".prep/rewritten"  # beside a file a later stage rewrote in place: what it was, what it is


def rewrite_record(path: str) -> Path:
    p = Path(path)
    return p.parent / REWRITTEN / f"{p.name}.json"


def record_rewrites(rewrote: dict[str, dict[str, Any]], outputs: dict[str, dict[str, Any]]) -> None:
    """Record that a task rewrote files an earlier stage wrote (`rewrote`: path -> the {bytes, checksum}
    it replaced) into `outputs[path]`. The earlier stage's done-marker names the old file; with this
    record it stays valid while the new file is intact, so re-running the chain (precache, then an
    in-place merge_source_tar) does not redo the earlier stage. Records chain: a file rewritten again
    keeps its link back to the first writer."""
    for p, before in rewrote.items():
        after = outputs[p]
        if before["checksum"] == after["checksum"]:
            continue  # the same bytes again (a forced re-run): nothing to link
        chain = _rewrites(p)
        chain[before["checksum"]] = {"bytes": int(after["bytes"]), "checksum": after["checksum"]}
        write_text_atomic(rewrite_record(p), json.dumps(chain, indent=1, sort_keys=True))


def _rewrites(path: str) -> dict[str, dict[str, Any]]:
    """{checksum the file had: {bytes, checksum} it was rewritten to} for `path` ({} when never)."""
    try:
        doc = json.loads(rewrite_record(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _intact(path: str, meta: dict[str, Any], verify: bool) -> bool:
    """Whether `path` still is what a marker recorded (`meta`), or what later stages rewrote that into in
    place (`record_rewrites`)."""
    chain = None
    for _ in range(64):  # a chain of rewrites, never a loop
        if os.path.getsize(path) == meta["bytes"] and (not verify or file_matches(path, meta["checksum"])):
            return True
        chain = _rewrites(path) if chain is None else chain
        nxt = chain.get(meta["checksum"])
        if not isinstance(nxt, dict) or "bytes" not in nxt or "checksum" not in nxt:
            return False
        meta = nxt
    return False


def write_marker(marker_dir: Path, task: Task, fingerprint: str, result: TaskResult) -> None:
    """Write the task's marker, and remove the one an older prep wrote for it under the legacy name (so
    readers of every marker, `prep report`, see the task once)."""
    doc = {"task_id": task.id, "fingerprint": fingerprint, "outputs": result.outputs,
           "result": result.to_json()}
    path = marker_path(marker_dir, task)
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True))
    legacy = legacy_marker_file(marker_dir, task.id)
    if legacy != path and _read_doc(legacy).get("task_id") == task.id:
        legacy.unlink(missing_ok=True)


def _read_doc(path: Path) -> dict[str, Any]:
    """A marker's JSON object ({} when it is missing or unreadable)."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_valid_marker(marker_dir: Path, task: Task, fingerprint: str, *,
                      verify: bool = False) -> TaskResult | None:
    """The stored result if the marker matches this task and its outputs are intact, else None. A task
    without a marker of its own may have one an older prep wrote under the legacy name."""
    doc = _read_doc(recorded_marker_file(marker_dir, task.id))
    if doc.get("fingerprint") != fingerprint or doc.get("task_id") != task.id:
        return None
    outputs = doc.get("outputs") or {}
    if set(outputs) != set(task.outputs):
        return None
    try:
        for p, meta in outputs.items():
            if not _intact(p, meta, verify):
                return None
        result = TaskResult.from_json(doc["result"])
    except (OSError, KeyError, TypeError, AttributeError):  # output gone, or a marker from elsewhere
        return None
    result.status = "skipped"
    return result



FINALIZED = ".finalized"  # no `.json` suffix, so no task id can name it


def folder_listing(places: list[Path]) -> dict[str, tuple[int, int]]:
    """{path: (bytes, mtime_ns)} of the files directly in `places` and in their hidden folders (what
    finalize writes lives there: manifest.json, wdinfo.pkl, .nv-meta/, .prep/ reports), or of a place
    that is itself a file. Shards in ordinary sub-folders are tasks' outputs, which markers track."""
    out: dict[str, tuple[int, int]] = {}
    for place in places:
        try:
            if os.path.isfile(place):
                st = os.stat(place)
                out[str(place)] = (st.st_size, st.st_mtime_ns)
                continue
            folders = [str(place)]
            while folders:
                for e in os.scandir(folders.pop()):
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out[e.path] = (st.st_size, st.st_mtime_ns)
                    elif e.name.startswith(".") and e.is_dir(follow_symlinks=False):
                        folders.append(e.path)
        except OSError:
            continue
    return out


def finalize_digest(fingerprints: list[tuple[str, str]], settings: dict[str, Any]) -> str:
    """What a finalize depends on: every task of the whole plan and its fingerprint, and the settings
    finalize reads besides the tasks' results (the stage's config section, --strict): wdinfo.pkl's
    chunk_size, whether .nv-meta/ is written, whether damage or missing members fail the stage."""
    doc = json.dumps([sorted(fingerprints), settings], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def write_finalized(marker_dir: Path, digest: str, before: dict[str, tuple[int, int]],
                    after: dict[str, tuple[int, int]]) -> None:
    """Record that finalize ran for this plan, and the files it wrote: new or changed between the two
    listings, plus those an earlier finalize recorded that are still there (a finalize that rewrites a
    file with the same bytes leaves it untouched, yet it is still finalize's). A later stage may rewrite
    them (generate_wdinfo extends a manifest): only their presence is checked."""
    wrote = {p for p, st in after.items() if before.get(p) != st}
    wrote.update(p for p in _recorded(marker_dir) if p in after)
    doc = {"digest": digest, "wrote": sorted(wrote)}
    write_text_atomic(marker_dir / FINALIZED, json.dumps(doc, indent=1))


def _recorded(marker_dir: Path) -> list[str]:
    """The files the last finalize recorded ([] when none did, or its record is unreadable)."""
    try:
        wrote = json.loads((marker_dir / FINALIZED).read_text("utf-8"))["wrote"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return []
    return [p for p in wrote if isinstance(p, str)] if isinstance(wrote, list) else []


def finalized_already(marker_dir: Path, digest: str) -> bool:
    """True when finalize ran for exactly this plan and every file it wrote is still there."""
    try:
        doc = json.loads((marker_dir / FINALIZED).read_text("utf-8"))
        return doc["digest"] == digest and all(os.path.isfile(p) for p in doc["wrote"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return False
