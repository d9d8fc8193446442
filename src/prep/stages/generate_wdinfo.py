"""generate_wdinfo: index any folder of shards and describe it for NeMo, energon and prep's loaders.

One task per shard builds (or checks) its `.idx` and counts its real samples; `finalize` writes
`manifest.json`, `wdinfo.pkl` and `.nv-meta/`. Nothing is dropped silently: shards whose count is not
`tar_chunk_size` are named, and NeMo's `total_key_count` is the true total.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from prep.errors import PrepError
from prep.formats.checksum import file_checksum
from prep.formats.index import encode_index, index_path, write_index
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.formats.nvmeta import user_dataset_yaml, write_nv_meta
from prep.formats.tar import scan_tar, shard_folder
from prep.formats.wdinfo import write_wdinfo
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "generate_wdinfo"
TITLE = "index shards (.idx), count samples, write wdinfo.pkl (NeMo), manifest.json and .nv-meta/ (energon)"
VERSION = 1
TORCHRUN_RANKS = False
MAX_NAMED = 20  # shards named one by one in notes before summarising


class Config(StageConfig):
    input_dir: list[Path] = Field(default_factory=list,
                                  description="shard folder(s) (default: the output of the last "
                                  "enabled stage that writes shards)")
    recursive: bool = Field(True, description="also index shards in sub-folders")
    tar_chunk_size: int | None = Field(None, ge=1,
                                       description="expected samples per shard (NeMo's chunk_size); "
                                       "default: reorganize_tar.tar_chunk_size when input_dir is unset and "
                                       "follows reorganize_tar, else the most common count")
    file_ext_in_tar: list[str] = Field(default_factory=list,
                                       description="extensions every sample must have, e.g. [jpg, txt]")
    output_wdinfo_path: Path | None = Field(None, description="where wdinfo.pkl goes: the shard folder or "
                                            "one above it, since its tar_files are relative to its folder "
                                            "(default: <input_dir>/wdinfo.pkl)")
    write_nv_meta: bool = Field(True, description="write .nv-meta/ so megatron-energon loads the folder")
    rebuild_index: bool = Field(False, description="rewrite every .idx even when one exists")
    strict: bool = Field(False, description="fail when a shard's count differs from tar_chunk_size, except "
                         "a short last shard of its folder (reorganize_tar's tail: keep), or when a sample "
                         "lacks a file_ext_in_tar member")

    @field_validator("input_dir", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | os.PathLike) else v

    @field_validator("file_ext_in_tar", mode="after")
    @classmethod
    def _strip_dots(cls, v: list[str]) -> list[str]:
        return [e.lstrip(".") for e in v]


def output_dirs(root: PrepConfig) -> list[Path]:
    """Where the stage writes: each shard folder (.idx, manifest.json, .nv-meta/; the first holds the
    done-markers) and wdinfo.pkl."""
    cfg: Config = root.generate_wdinfo
    if not cfg.input_dir:
        raise PrepError("generate_wdinfo.input_dir is not set", "config",
                        "set generate_wdinfo.input_dir or dataset_output_root")
    folders = [Path(f) for f in cfg.input_dir]
    return [*folders, Path(cfg.output_wdinfo_path) if cfg.output_wdinfo_path else _wdinfo_path(folders)]


def _wdinfo_path(folders: list[Path]) -> Path:
    """wdinfo.pkl's default place: the shard folder, or the folder above all of them."""
    base = Path(os.path.commonpath([str(f.resolve()) for f in folders])) if len(folders) > 1 else folders[0]
    return base / "wdinfo.pkl"


def wdinfo_file(cfg: Config) -> Path:
    """Where wdinfo.pkl goes. Its `tar_files` are relative to its folder (as NeMo and prep's loaders read
    them, never leaving it), so that folder must hold every shard folder."""
    folders = [Path(f) for f in cfg.input_dir]
    path = Path(cfg.output_wdinfo_path) if cfg.output_wdinfo_path else _wdinfo_path(folders)
    base = path.parent.resolve()
    outside = next((f for f in folders if not f.resolve().is_relative_to(base)), None)
    if outside is not None:
        raise PrepError(f"wdinfo.pkl lists shards relative to its folder {base}, which does not hold the "
                        f"shard folder {outside}", "config generate_wdinfo.output_wdinfo_path",
                        "put wdinfo.pkl in the shard folder or a folder above it (or leave the key unset)")
    return path


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    cfg: Config = root.generate_wdinfo
    if not cfg.input_dir:
        raise PrepError("generate_wdinfo.input_dir is not set", "config",
                        "set generate_wdinfo.input_dir (or dataset_output_root)")
    wdinfo_file(cfg)
    tasks: list[Task] = []
    for i, folder in enumerate(cfg.input_dir):
        shards = shard_folder(Path(folder), "point generate_wdinfo.input_dir at the folder that holds the "
                              ".tar files", recursive=cfg.recursive)
        if not shards:
            raise PrepError("no .tar shards found", str(folder),
                            "point generate_wdinfo.input_dir at a folder of WebDataset .tar files")
        for tar in shards:
            rel = tar.relative_to(folder).as_posix()
            st = tar.stat()
            # absolute, not resolved: a symlinked shard gets its .idx beside the link, where loaders look
            payload = {"tar": str(tar.absolute()), "folder": i, "rel": rel, "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "required": cfg.file_ext_in_tar,
                       "rebuild_index": cfg.rebuild_index}
            tasks.append(Task(f"{i}-{rel}", payload, (str(index_path(tar.absolute())),)))
    return tasks


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    tar = Path(task.payload["tar"])
    scan = scan_tar(tar)
    offsets = scan.index_offsets()
    if not scan.samples:
        raise PrepError("shard holds no samples", str(tar), "remove the empty shard or re-create it")
    idx = index_path(tar)
    wanted = encode_index(offsets)
    rebuilt = task.payload["rebuild_index"] or not idx.exists() or idx.read_bytes() != wanted
    if rebuilt:
        write_index(tar, offsets)
    fields = Counter(ext for s in scan.samples for ext in s.members)
    missing: Counter[str] = Counter()
    notes: list[str] = []
    for s in scan.samples:
        for ext in task.payload["required"]:
            if ext not in s.members:
                missing[ext] += 1
                if len(notes) < 5:
                    notes.append(f"{tar.name}: sample {s.key!r} has no .{ext}")
    notes += [f"{tar.name}: skipped member {n!r} ({why})" for n, why in scan.skipped[:5]]
    checksum = file_checksum(tar)
    return TaskResult(
        task.id,
        counts={"shards": 1, "samples": len(scan.samples), "indexes_written": int(rebuilt),
                "members_skipped": len(scan.skipped)},
        dropped={},
        notes=notes,
        data={"rel": task.payload["rel"], "folder": task.payload["folder"], "samples": len(scan.samples),
              "bytes": tar.stat().st_size, "checksum": checksum, "fields": dict(fields),
              "missing": dict(missing)},
    )


def _merge_fields(old: dict[str, dict[str, Any]], counts: Counter[str]) -> dict[str, dict[str, Any]]:
    """Field counts from this scan, keeping what earlier stages recorded (dtype/shape of encodings)."""
    out: dict[str, dict[str, Any]] = {}
    for ext in sorted(counts):
        entry = dict(old.get(ext, {}))
        entry["samples"] = counts[ext]
        out[ext] = entry
    return out


def short_tails(shards: list[tuple[int, str, int]], chunk: int) -> set[tuple[int, str]]:
    """The (folder, rel) of each folder's last shard (by relative path) when it holds fewer than `chunk`
    samples: the one short shard reorganize_tar's `tail: keep` leaves, normal output rather than a
    problem to warn about, which `strict` accepts."""
    last: dict[int, str] = {}
    for folder, rel, _ in shards:
        last[folder] = max(last.get(folder, rel), rel)
    return {(folder, rel) for folder, rel, n in shards if n < chunk and last[folder] == rel}


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    cfg: Config = root.generate_wdinfo
    strict = cfg.strict or opts.strict
    folders = [Path(f) for f in cfg.input_dir]
    per_folder: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        per_folder.setdefault(r.data["folder"], []).append(r.data)
    all_counts = [r.data["samples"] for r in results]
    chunk = cfg.tar_chunk_size or Counter(all_counts).most_common(1)[0][0]
    notes: list[str] = []
    layout = [(r.data["folder"], r.data["rel"], r.data["samples"]) for r in results]
    tails = short_tails(layout, chunk)
    off = [(folders[f] / rel, n) for f, rel, n in layout if n != chunk]
    odd = [(folders[f] / rel, n) for f, rel, n in layout if n != chunk and (f, rel) not in tails]
    missing: Counter[str] = Counter()
    for r in results:
        missing.update(r.data["missing"])
    if missing:
        notes.append("samples missing a required member: "
                     + ", ".join(f".{e}: {n}" for e, n in sorted(missing.items())))
    if off and not odd:
        notes += [f"shard {path} holds {n} samples: the one short last shard reorganize_tar leaves "
                  f"(tail: keep); wdinfo.pkl records the true total_key_count" for path, n in off]
    elif off:
        for path, n in off[:MAX_NAMED]:
            notes.append(f"shard {path} has {n} samples, not tar_chunk_size={chunk}")
        if len(off) > MAX_NAMED:
            notes.append(f"… {len(off) - MAX_NAMED} more shards are not {chunk} samples")
        notes.append(f"WARNING: {len(off)} of {len(results)} shards are not {chunk} samples; wdinfo.pkl "
                     "records the true total_key_count, but loaders that assume len(tar_files)*chunk_size "
                     "will be off")
    if odd and strict:
        raise PrepError(f"{len(odd)} shard(s) do not hold tar_chunk_size={chunk} samples and are not the "
                        f"short last shard of their folder (first: {odd[0][0]} with {odd[0][1]})", NAME,
                        "repack with `prep run reorganize_tar`, or drop --strict to accept them")
    if missing and strict:
        raise PrepError(f"{sum(missing.values())} sample(s) lack a required member", NAME,
                        "repack with reorganize_tar (it drops and reports them), or drop --strict")
    for i, folder in enumerate(folders):
        entries = sorted(per_folder.get(i, []), key=lambda d: d["rel"])
        old = None
        try:
            old = read_manifest(folder)
        except PrepError:
            old = None
        fields: Counter[str] = Counter()
        for d in entries:
            fields.update(d["fields"])
        history = list(old.history) if old else []
        if not history or history[-1].get("stage") != NAME:
            history.append({"stage": NAME, "tar_chunk_size": chunk})
        manifest = Manifest(
            shards=[ShardEntry(d["rel"], d["samples"], d["bytes"], d["checksum"]) for d in entries],
            fields=_merge_fields(old.fields if old else {}, fields),
            encoders=old.encoders if old else {},
            history=history,
            chunk_size=chunk,
        )
        write_manifest(folder, manifest)
        if cfg.write_nv_meta:
            if user_dataset_yaml(folder):
                notes.append(f"kept {folder / '.nv-meta' / 'dataset.yaml'} (not written by prep)")
            write_nv_meta(folder, {d["rel"]: d["samples"] for d in entries}, sorted(fields))
    wd_path = wdinfo_file(cfg)
    base = wd_path.parent.resolve()
    tar_files = [(folders[r.data["folder"]].resolve() / r.data["rel"]).relative_to(base).as_posix()
                 for r in results]
    total = sum(all_counts)
    write_wdinfo(wd_path, tar_files, chunk, total)
    notes.append(f"wrote {wd_path} ({len(tar_files)} shards, chunk_size {chunk}, total_key_count {total})")
    return notes
