"""merge_source_tar: append source members (jpg, txt, ...) to precached shards written apart from them.

Contract with precache_encodings (`keep_source: false`): precache writes `<its output_dir>/<REL>.tar`
holding only `KEY.<encoder>.npy` members, where REL is the relative name of the source shard under
`source_dir` (reorganize_tar's flat `NNNNNN.tar`, or any nested layout). One task per precached shard
joins each key's chosen source members, rewrites the shard sorted and atomically (+ `.idx`), and
reports every key that found no source. Re-running, in place or not, gives the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.checksum import file_checksum
from prep.formats.index import index_path, write_index
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.formats.tar import Sample, scan_tar, shard_files, shard_folder
from prep.formats.tar_write import FileSlice, MemberData, write_shard
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult, unplanned_shards_warning

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "merge_source_tar"
TITLE = "join source members (jpg/txt) into precached shards that were written apart from them"
VERSION = 1
TORCHRUN_RANKS = False
KEYS_NAMED = 5
NO_SOURCE_REPORT = "merge_source_tar.no_source.jsonl"


class Config(StageConfig):
    enable: bool | None = Field(None, description="run this stage in `prep run all`; unset: exactly when "  # type: ignore[assignment]
                                "precache_encodings runs and writes its encodings apart (keep_source: false)")
    input_dir: Path | None = Field(None, description="precached shards "
                                   "(default: precache_encodings.output_dir)")
    source_dir: Path | None = Field(None, description="source shards with the same relative names "
                                    "(default: precache_encodings' input)")
    output_dir: Path | None = Field(None, description="merged shards "
                                    "(default: input_dir, rewritten in place)")
    source_extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "txt", "json"],
        description="source members to append to each key, e.g. [jpg, txt, json]; [] appends every member; "
        "a listed one the source sample lacks is reported")
    strict: bool = Field(False, description="fail the stage when a key found no source sample or lacks a "
                         "listed source member")

    @field_validator("source_extensions", mode="after")
    @classmethod
    def _strip_dots(cls, v: list[str]) -> list[str]:
        return [e.lstrip(".") for e in v]


def _dirs(root: PrepConfig) -> tuple[Path, Path, Path]:
    cfg: Config = root.merge_source_tar
    if cfg.input_dir is None or cfg.source_dir is None:
        raise PrepError("merge_source_tar.input_dir or source_dir is not set", "config",
                        "set both (or dataset_output_root, which chains them from precache and reorganize)")
    inp, src = Path(cfg.input_dir).resolve(), Path(cfg.source_dir).resolve()
    out = Path(cfg.output_dir).resolve() if cfg.output_dir is not None else inp
    if src in (inp, out):
        raise PrepError("source_dir is the same folder as input_dir or output_dir", "config merge_source_tar",
                        "point source_dir at the shards holding the source members (reorganize_tar's output)")
    return inp, src, out


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_dirs(root)[2]]


def _identity(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"exists": False}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    cfg: Config = root.merge_source_tar
    inp, src, out = _dirs(root)
    shards = shard_folder(inp, "run precache_encodings first or set merge_source_tar.input_dir", skip=out)
    if not shards:
        raise PrepError("no .tar shards found", str(inp), "run precache_encodings (keep_source: false) first")
    in_place = out == inp
    tasks = []
    for tar in shards:
        rel = tar.relative_to(inp).as_posix()
        dest = out / rel
        payload: dict[str, Any] = {"rel": rel, "tar": str(tar), "source": str(src / rel), "out": str(dest),
                                   "extensions": cfg.source_extensions,
                                   "source_identity": _identity(src / rel)}
        if not in_place:  # in place, the input is the output: its marker records its size instead
            payload["input_identity"] = _identity(tar)
        tasks.append(Task(rel, payload, (str(dest), str(index_path(dest)))))
    return tasks


def _slices(path: str, sample: Sample, exts: list[str]) -> dict[str, MemberData]:
    return {e: FileSlice(path, sample.members[e].data_offset, sample.members[e].size) for e in exts}


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    p = task.payload
    dest = Path(p["out"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    scan = scan_tar(p["tar"])
    if not scan.samples:
        raise PrepError("precached shard holds no samples", p["tar"], "re-run precache_encodings for it")
    source = Path(p["source"])
    notes: list[str] = []
    by_key: dict[str, Sample] = {}
    if source.exists():
        src_scan = scan_tar(source, tolerate_damage=True)
        by_key = {s.key: s for s in src_scan.samples}
        if src_scan.error is not None:
            notes.append(f"{p['rel']}: source shard damaged at byte {src_scan.error.offset} "
                         f"({src_scan.error.what}); keys after it found no source")
    else:
        notes.append(f"{p['rel']}: no source shard at {source}")

    wanted: list[str] = p["extensions"]
    samples: list[tuple[str, dict[str, MemberData]]] = []
    no_source: list[str] = []
    missing: Counter[str] = Counter()
    appended = present = 0
    fields: Counter[str] = Counter()
    for s in scan.samples:
        members = _slices(p["tar"], s, sorted(s.members))
        src = by_key.pop(s.key, None)
        if src is None:
            no_source.append(s.key)
        else:
            for e in wanted or sorted(src.members):
                if e not in src.members:
                    missing[e] += 1
                elif e in members:  # precache kept it, or an earlier merge already appended it
                    present += 1
                else:
                    members.update(_slices(str(source), src, [e]))
                    appended += 1
        fields.update(members.keys())
        samples.append((s.key, members))
    # in place, the precached shard and its .idx are replaced: say what they were (precache's marker)
    rewrote = {str(f): {"bytes": f.stat().st_size, "checksum": file_checksum(f)}
               for f in (dest, index_path(dest)) if Path(p["tar"]) == dest and f.exists()}
    info = write_shard(dest, samples)
    write_index(dest, info.offsets)

    if no_source:
        more = f" and {len(no_source) - KEYS_NAMED} more" if len(no_source) > KEYS_NAMED else ""
        notes.append(f"{p['rel']}: {len(no_source)} key(s) found no source sample: "
                     f"{', '.join(no_source[:KEYS_NAMED])}{more}")
    for e, n in sorted(missing.items()):
        notes.append(f"{p['rel']}: {n} source sample(s) have no .{e}")
    counts = {"shards": 1, "samples": len(samples), "members_appended": appended,
              "members_already_present": present, "keys_without_source": len(no_source),
              "source_members_missing": sum(missing.values()), "source_samples_unused": len(by_key),
              "bytes_out": info.bytes}
    return TaskResult(
        task.id, counts=counts, notes=notes,
        data={"rel": p["rel"], "samples": len(samples), "bytes": info.bytes, "checksum": info.checksum,
              "fields": dict(fields), "no_source": no_source, "missing": dict(missing)},
        outputs={str(dest): {"bytes": info.bytes, "checksum": info.checksum}}, rewrote=rewrote,
    )


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    """Write the no-source report and manifest.json (keeping precache's encoder and field records)."""
    cfg: Config = root.merge_source_tar
    inp, src, out = _dirs(root)
    lost = [(r.data["rel"], k) for r in results for k in r.data["no_source"]]
    write_text_atomic(out / ".prep" / NO_SOURCE_REPORT,
                      "".join(json.dumps({"shard": rel, "key": k}) + "\n" for rel, k in lost))
    missing: Counter[str] = Counter()
    for r in results:
        missing.update(r.data["missing"])
    if (lost or missing) and (cfg.strict or opts.strict):
        what = f"{len(lost)} key(s) found no source sample" if lost else "source samples lack listed members"
        raise PrepError(f"{what} (first: {lost[0][0]}:{lost[0][1]})" if lost else what, NAME,
                        f"check source_dir {src} matches the precached shards, or drop strict "
                        f"(every key is in {out / '.prep' / NO_SOURCE_REPORT})")
    try:
        old: Manifest | None = read_manifest(inp)
    except PrepError:
        old = None
    fields: Counter[str] = Counter()
    for r in results:
        fields.update(r.data["fields"])
    merged_fields = {}
    for e, n in sorted(fields.items()):
        merged_fields[e] = {**(old.fields.get(e, {}) if old else {}), "samples": n}
    history = list(old.history) if old else []
    step = {"stage": NAME, "source_extensions": cfg.source_extensions}
    if not history or history[-1] != step:
        history.append(step)
    manifest = Manifest(
        [ShardEntry(r.data["rel"], r.data["samples"], r.data["bytes"], r.data["checksum"]) for r in results],
        merged_fields, old.encoders if old else {}, history, old.chunk_size if old else None)
    write_manifest(out, manifest)
    notes = [f"merged {len(results)} shards, {manifest.total_samples} samples into {out}"]
    if lost:
        notes.append(f"WARNING: {len(lost)} key(s) found no source sample (kept with their encodings only); "
                     f"all listed in {out / '.prep' / NO_SOURCE_REPORT}")
    if missing:
        notes.append("source samples missing listed members: "
                     + ", ".join(f".{e}: {n}" for e, n in sorted(missing.items())))
    merged = {r.data["rel"] for r in results}
    notes += unplanned_shards_warning(out, merged) if out != inp else []
    unmatched = [rel for rel in (t.relative_to(src).as_posix() for t in shard_files(src, skip=out))
                 if rel not in merged] if src.is_dir() else []
    if unmatched:
        notes.append(f"WARNING: {len(unmatched)} source shard(s) have no precached shard, so none of their "
                     f"samples is in {out} (first: {unmatched[0]}); run precache_encodings for them, or "
                     "check merge_source_tar.input_dir")
    return notes
