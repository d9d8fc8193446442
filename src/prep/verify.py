"""`prep verify DIR`: check every shard against its `.idx` and the manifest (count, size, checksum), and
the loaders' metadata (`.nv-meta/.info.json`, `wdinfo.pkl`) against the shards as they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prep.errors import PrepError
from prep.formats.checksum import file_matches
from prep.formats.index import index_path, read_index
from prep.formats.manifest import MANIFEST_NAME, read_manifest
from prep.formats.tar import scan_tar, shard_files


def _relist(folder: Path) -> str:
    """The command that writes a shard folder's indexes and listings anew from the shards as they are."""
    return f"prep run generate_wdinfo --set generate_wdinfo.input_dir={folder}"


def _fixed(what: str, fix: str | None) -> str:
    return f"{what} — fix: {fix}" if fix else what


@dataclass
class ShardCheck:
    path: str
    problems: list[str]  # each one line: what is wrong — fix: what to do
    samples: int | None = None  # as scanned; None when the shard could not be read


def check_shard(tar: Path, expected: tuple[int, int, str] | None, relist: str) -> ShardCheck:
    """Scan the shard, compare with its .idx and, where given, the manifest's (samples, bytes, checksum).
    Each problem says what to do, naming `relist` (`_relist` of its folder) where that is the fix."""
    problems: list[str] = []
    if not tar.exists():
        return ShardCheck(str(tar), [_fixed("listed in the manifest but missing",
                                            f"restore the shard, or list the folder anew: {relist}")])
    try:
        scan = scan_tar(tar)
    except PrepError as err:
        return ShardCheck(str(tar), [_fixed(err.what, err.fix)])
    samples = len(scan.samples)
    offsets = np.array(scan.index_offsets(), dtype=np.uint64)
    reindex = f"write the indexes anew: {relist}"
    if index_path(tar).exists():
        try:
            idx = read_index(tar)
            if len(idx) != len(offsets):
                problems.append(_fixed(f".idx has {len(idx) - 1} samples, the tar has {len(offsets) - 1}",
                                       reindex))
            elif not np.array_equal(idx, offsets):
                first = int(np.nonzero(idx != offsets)[0][0])
                problems.append(_fixed(f".idx offset {first} is {int(idx[first])}, "
                                       f"the tar has {int(offsets[first])}", reindex))
        except PrepError as err:
            problems.append(_fixed(err.what, reindex))
    else:
        problems.append(_fixed(".idx is missing", reindex))
    if expected is not None:
        changed = (f"re-create the shard (re-run the stage that wrote it, with --force); if the change is "
                   f"wanted, list the shards anew: {relist}")
        listed, size, checksum = expected
        if samples != listed:
            problems.append(_fixed(f"manifest says {listed} samples, the tar has {samples}", changed))
        actual = tar.stat().st_size
        if actual != size:
            problems.append(_fixed(f"manifest says {size} bytes, the file has {actual}", changed))
        elif not file_matches(tar, checksum):
            problems.append(_fixed(f"{checksum.partition(':')[0]} checksum differs from the manifest (the "
                                   "shard's bytes changed)", changed))
    return ShardCheck(str(tar), problems, samples)


def check_metadata(folder: Path, counts: dict[str, int]) -> list[ShardCheck]:
    """Stale loader metadata: energon's shard counts and NeMo's wdinfo.pkl must describe these shards."""
    from prep.formats.nvmeta import NV_META
    from prep.formats.wdinfo import read_wdinfo

    relist = f"list the folder anew: {_relist(folder)}"
    out: list[ShardCheck] = []
    info = folder / NV_META / ".info.json"
    if info.exists():
        try:
            listed = json.loads(info.read_text("utf-8"))["shard_counts"]
            wrong = sorted(k for k in set(listed) | set(counts) if listed.get(k) != counts.get(k))
            if wrong:
                out.append(ShardCheck(str(info), [_fixed(
                    f"shard counts differ from the shards for {len(wrong)} shard(s), first {wrong[0]}: "
                    f"says {listed.get(wrong[0])}, has {counts.get(wrong[0])}", relist)]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            out.append(ShardCheck(str(info), [_fixed(f"unreadable ({type(err).__name__}: {err})", relist)]))
    wd = folder / "wdinfo.pkl"
    if wd.exists():
        try:
            nemo = read_wdinfo(wd)
            if sorted(nemo["tar_files"]) != sorted(counts):
                out.append(ShardCheck(str(wd), [_fixed("tar_files lists other shards than the folder holds",
                                                       relist)]))
            elif nemo["total_key_count"] != sum(counts.values()):
                held = sum(counts.values())
                out.append(ShardCheck(str(wd), [_fixed(f"total_key_count {nemo['total_key_count']} but the "
                                                       f"shards hold {held} samples", relist)]))
        except PrepError as err:
            out.append(ShardCheck(str(wd), [_fixed(err.what, relist)]))
    return out


def require_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise PrepError("not a folder" if folder.exists() else "folder does not exist", str(folder),
                        "point prep verify at a shard folder")
    return folder


def verify_folder(folder: Path, advance: Callable[[int], None] | None = None) -> list[ShardCheck]:
    """Every problem found in the folder's shards; an empty list means all is well."""
    folder = require_folder(folder)
    expected: dict[str, tuple[int, int, str]] = {}
    has_manifest = (folder / MANIFEST_NAME).exists()
    if has_manifest:
        for s in read_manifest(folder).shards:
            expected[s.path] = (s.samples, s.bytes, s.checksum)
    on_disk = {p.relative_to(folder).as_posix(): p for p in shard_files(folder)}
    if not on_disk and not expected:
        raise PrepError("no .tar shards found", str(folder), "point prep verify at a shard folder")
    checks: list[ShardCheck] = []
    relist = _relist(folder)
    for rel in sorted(set(on_disk) | set(expected)):
        path = on_disk.get(rel, folder / rel)
        c = check_shard(path, expected.get(rel), relist)
        if has_manifest and rel not in expected:
            c.problems.append(_fixed("not listed in manifest.json", f"list the folder anew: {relist}"))
        checks.append(c)
        if advance:
            advance(1)
    if all(c.samples is not None for c in checks):  # metadata is only comparable with readable shards
        counts = {rel: c.samples for rel, c in zip(sorted(set(on_disk) | set(expected)), checks, strict=True)}
        checks += check_metadata(folder, {k: v for k, v in counts.items() if v is not None})
    return checks
