"""reorganize_tar: repack uneven tars into equal shards of `tar_chunk_size` samples, planned globally.

The plan counts the usable samples of every input tar (a header scan, or img2dataset's `_stats.json`
when it can be trusted), lays all samples in one order (inputs by path, samples by key) and gives
output shard j the samples [j*C, (j+1)*C). Each output shard is one task, so the work splits over
processes, Slurm array tasks or Ray with at most ONE short shard in the whole output (`tail`).
Member bytes are streamed from the inputs (`FileSlice`); nothing is extracted and inputs are never
modified. A task writes its shard atomically, so a re-run after kill -9 gives the same bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.index import index_path, write_index
from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.formats.names import canonical_ext
from prep.formats.tar import Sample, TarScan, gc_paused, scan_tar, shard_folder
from prep.formats.tar_write import FileSlice, MemberData, write_shard
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult, unplanned_shards_warning

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "reorganize_tar"
TITLE = "repack uneven tars into equal shards of tar_chunk_size samples (+ .idx), planned globally"
VERSION = 1
TORCHRUN_RANKS = False
KEYS_NAMED = 5  # dropped keys named in the summary (every one goes to the report file)
COUNTS_CACHE = "reorganize_tar.counts.json"
COUNT_RULES = 2  # what makes a sample usable, for the counts cache (2: case-clashing image members drop it)
SCAN_CACHE_SAMPLES = 300_000  # samples of input scans kept per process (about 1 KB each)
DROPPED_REPORT = "reorganize_tar.dropped.jsonl"
READ_GAP = 1 << 16  # unordered samples closer than this in their tar are prefetched together


class Config(StageConfig):
    input_dir: Path | None = Field(None, description="raw tars, searched recursively and sorted by relative "
                                   "path (default: the output of download_images or ingest_local, the last "
                                   "enabled)")
    output_dir: Path | None = Field(None, description="flat output: NNNNNN.tar + .idx + manifest.json "
                                    "(default: <root>/tarfiles_reorganized)")
    tar_chunk_size: int = Field(1000, ge=1, description="samples per output shard")
    tail: Literal["keep", "drop", "fill"] = Field(
        "keep", description="the one short last shard: keep it, drop its samples (reported), or fill it to "
        "tar_chunk_size with copies of the first samples (keys get a _fillN suffix)")
    file_ext_in_tar: list[str] = Field(
        default_factory=list, description="member extensions to keep, each required: a sample missing one is "
        "dropped and reported; empty keeps every member of every sample (image extensions in any case: "
        "JPG is jpg, as the shards name them)")
    keep_other_members: bool = Field(False, description="with file_ext_in_tar: also keep members not listed "
                                     "(they are then only required, not selected)")
    count_from: Literal["auto", "scan", "stats"] = Field(
        "auto", description="how the plan counts samples per input tar: scan = read tar headers; stats = "
        "img2dataset's NNNNN_stats.json (must exist for every tar); auto = stats when trustworthy and "
        "file_ext_in_tar is empty (stats count samples, not those with every listed member), else scan")
    scan_threads: int | None = Field(
        None, ge=1, description="threads that scan input headers while planning; unset: 8 on a network "
        "filesystem (nfs, lustre, gpfs, beegfs, ceph, cifs, fuse), where each read waits on the network, "
        "else 1 (on local disks threads only contend for the GIL)")
    strict: bool = Field(False, description="fail the stage when an input tar is truncated or corrupt "
                         "(its samples before the damage are still repacked)")
    fsync: bool = Field(True, description="fsync each shard before renaming it into place, so a power "
                        "loss or kernel crash cannot leave a finished-looking empty shard; false skips it "
                        "(faster where fsync is slow; kill -9 resumes just as well: the page cache outlives "
                        "the process)")

    @field_validator("file_ext_in_tar", mode="after")
    @classmethod
    def _canonical(cls, v: list[str]) -> list[str]:
        return [canonical_ext(e.lstrip(".")) for e in v]  # members are matched by their canonical names


# ------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Which members a sample must have and which it keeps (`keep=None`: all of them)."""

    required: tuple[str, ...]
    keep: tuple[str, ...] | None

    @classmethod
    def of(cls, cfg: Config) -> Selection:
        req = tuple(sorted(set(cfg.file_ext_in_tar)))
        return cls(req, None if cfg.keep_other_members or not req else req)

    def to_json(self) -> dict[str, Any]:
        return {"required": list(self.required), "keep": None if self.keep is None else list(self.keep)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Selection:
        keep = doc["keep"]
        return cls(tuple(doc["required"]), None if keep is None else tuple(keep))

    def missing(self, sample: Sample) -> list[str]:
        return [e for e in self.required if e not in sample.members]

    def members(self, sample: Sample) -> list[str]:
        return sorted(sample.members if self.keep is None else (e for e in self.keep if e in sample.members))


@dataclass
class InputScan:
    """One input tar, read from its headers: usable samples sorted by key, and what was dropped and why."""

    scan: TarScan
    usable: list[Sample]
    dropped: list[tuple[str, str]]  # (key, reason)


class _ScanCache:
    """Input scans kept per process under a budget of samples, so the plan's scans serve the tasks
    that run inline (pool workers start fresh), and neighbouring tasks share their boundary tars. The plan
    only fills free room (the first tars, which the first tasks need); a task evicts the least
    recently used scans (tars that earlier tasks finished with)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: OrderedDict[tuple[Any, ...], InputScan] = OrderedDict()
        self.samples = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[Any, ...], make: Callable[[], InputScan], evict: bool) -> InputScan:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        value = make()
        n = len(value.scan.samples)
        with self.lock:
            if key in self.items or n > self.budget or (not evict and self.samples + n > self.budget):
                return value
            while self.samples + n > self.budget:
                self.samples -= len(self.items.popitem(last=False)[1].scan.samples)
            self.items[key] = value
            self.samples += n
        return value


_SCANS = _ScanCache(SCAN_CACHE_SAMPLES)


def scan_input(path: str | os.PathLike[str], sel: Selection, *, evict: bool = True) -> InputScan:
    """The input's samples (usable ones sorted by key), scanned once per process while the file is
    unchanged. The result is shared: callers must not modify it."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, sel)
    return _SCANS.get(key, lambda: _scan_input(str(path), sel), evict)


def canonical_members(samples: list[Sample]) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples with their image members under canonical names (`names.canonical_ext`: `a.JPG` is
    written as `a.jpg`, which every reader looks for), and (key, reason) for each sample dropped because
    two of its members differ only in case (`a.jpg` and `a.JPG`: which one is the image is not prep's to
    guess, and both would be one member name)."""
    odd = {e for e in set(itertools.chain.from_iterable(s.members for s in samples)) if canonical_ext(e) != e}
    if not odd:  # nearly always: one pass over the members, in C, then one look at each distinct extension
        return samples, []
    out: list[Sample] = []
    dropped: list[tuple[str, str]] = []
    for s in samples:
        if s.members.keys().isdisjoint(odd):
            out.append(s)
            continue
        groups: dict[str, list[str]] = {}
        for e in s.members:
            groups.setdefault(canonical_ext(e), []).append(e)
        clash = next((sorted(g) for g in groups.values() if len(g) > 1), None)
        if clash is None:
            out.append(dataclasses.replace(s, members={canonical_ext(e): m for e, m in s.members.items()}))
        else:
            dropped.append((s.key, f"members {', '.join('.' + e for e in clash)} differ only in case"))
    return out, dropped


def _scan_input(path: str, sel: Selection) -> InputScan:
    scan = scan_tar(path, tolerate_damage=True)
    samples, dropped = canonical_members(scan.samples)
    if not sel.required:  # nothing required: every sample is usable
        return InputScan(scan, sorted(samples, key=attrgetter("key")), dropped)
    usable: list[Sample] = []
    for s in samples:
        miss = sel.missing(s)
        if miss:
            dropped.append((s.key, "missing " + ", ".join(f".{e}" for e in miss)))
        else:
            usable.append(s)
    usable.sort(key=attrgetter("key"))
    return InputScan(scan, usable, dropped)


# --------------------------------------------------------------------------------------------- layout


Segment = tuple[int, int, int]  # (input index, start, stop) in that input's key-sorted usable samples


def ranges(cum: list[int], lo: int, hi: int) -> list[Segment]:
    """The input segments covering global positions [lo, hi); `cum` holds the prefix sums (len n+1)."""
    out: list[Segment] = []
    i = max(bisect.bisect_right(cum, lo) - 1, 0)
    while lo < hi and i < len(cum) - 1:
        a, b = max(lo, cum[i]), min(hi, cum[i + 1])
        if a < b:
            out.append((i, a - cum[i], b - cum[i]))
        i += 1
    return out


@dataclass
class ShardPlan:
    """What one output shard holds: segments (with a key suffix, "" or "_fillN") and, for the last
    shard under `tail: drop`, the segments whose samples are dropped."""

    segments: list[tuple[int, int, int, str]]
    tail_dropped: list[Segment]


def layout(counts: list[int], chunk: int, tail: str) -> list[ShardPlan]:
    """The global plan: shard j takes positions [j*chunk, (j+1)*chunk) of all usable samples in order."""
    cum = [0]
    for n in counts:
        cum.append(cum[-1] + n)
    total = cum[-1]
    full, rem = divmod(total, chunk)
    shards = [ShardPlan([(*r, "") for r in ranges(cum, j * chunk, (j + 1) * chunk)], []) for j in range(full)]
    if rem == 0:
        return shards
    rest = ranges(cum, full * chunk, total)
    if tail == "keep":
        shards.append(ShardPlan([(*r, "") for r in rest], []))
    elif tail == "fill":
        segs = [(*r, "") for r in rest]
        need, rnd = chunk - rem, 0
        while need > 0:  # copies of samples 0, 1, ... (cycling when there are fewer than needed)
            take = min(need, total)
            segs += [(*r, f"_fill{rnd}") for r in ranges(cum, 0, take)]
            need, rnd = need - take, rnd + 1
        shards.append(ShardPlan(segs, []))
    elif shards:
        shards[-1].tail_dropped = rest
    return shards


def reporter_of(cum_start: int, chunk: int, n_shards: int) -> int:
    """The task that reports an input tar's drops and damage: the one holding its first position."""
    return min(cum_start // chunk, n_shards - 1)


# ------------------------------------------------------------------------------------------- counting


def stats_count(tar: Path, size: int, mtime_ns: int) -> int | None:
    """img2dataset's count of samples written (`successes` in `NNNNN_stats.json`), only when trustworthy:
    the stats were written after the tar, and the tar ends with tar's end-of-archive zero blocks (a
    truncated copy does not)."""
    stats = tar.with_name(f"{tar.stem}_stats.json")
    try:
        st = stats.stat()
        doc = json.loads(stats.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    n = doc.get("successes") if isinstance(doc, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or st.st_mtime_ns < mtime_ns:
        return None
    if size < 1024 or size % 512:
        return None
    with open(tar, "rb") as f:
        f.seek(size - 1024)
        if f.read(1024) != bytes(1024):
            return None
    return n


def stats_may_count(count_from: str, sel: Selection) -> bool:
    """Whether img2dataset's stats may stand for a tar's usable samples: they count every sample written,
    so under `auto` only when no member is required (a PNG, or a sample without a caption, would be
    counted yet dropped, and the plan's layout would be off); `stats` is the user's word for it."""
    return count_from == "stats" or (count_from == "auto" and not sel.required)


@dataclass(frozen=True)
class Counted:
    count: int
    source: str  # scan | stats
    key_range: tuple[str, str] | None  # min and max usable key, known when scanned


def _scan_count(path: str, sel: Selection) -> Counted:
    s = scan_input(path, sel, evict=False)
    rng = (s.usable[0].key, s.usable[-1].key) if s.usable else None
    return Counted(len(s.usable), "scan", rng)


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cifs", "smb3", "9p", "panfs",
                       "wekafs", "glusterfs")


def scan_threads_for(fstype: str) -> int:
    """Header-scan threads for a filesystem type: many where a read waits on the network, one where it
    is served from local disk or the page cache (there, threads only contend for the GIL)."""
    return 8 if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse") else 1


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it in /proc/mounts), or
    "" where that cannot be read."""
    target = str(path.resolve())
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return ""
    return fstype


def count_inputs(tars: list[Path], cfg: Config, sel: Selection, cache_path: Path) -> list[Counted]:
    """Usable samples per input tar. Scan results are cached by (path, size, mtime) so Slurm array
    tasks and re-runs do not re-read every header (`prep run reorganize_tar --dry-run` warms it)."""
    sig = json.dumps(sel.to_json(), sort_keys=True)
    try:
        cache = json.loads(cache_path.read_text("utf-8"))
        if cache.get("version") != [VERSION, COUNT_RULES] or cache.get("selection") != sig:
            cache = {}
    except (OSError, ValueError):
        cache = {}
    old: dict[str, list[Any]] = cache.get("tars", {}) if isinstance(cache, dict) else {}
    stats = [tar.stat() for tar in tars]
    out: list[Counted | None] = [None] * len(tars)
    to_scan: list[int] = []
    for i, (tar, st) in enumerate(zip(tars, stats, strict=True)):
        if stats_may_count(cfg.count_from, sel):
            n = stats_count(tar, st.st_size, st.st_mtime_ns)
            if n is not None:
                out[i] = Counted(n, "stats", None)
                continue
            if cfg.count_from == "stats":
                raise PrepError("no trustworthy img2dataset _stats.json for this tar (missing, older than "
                                "the tar, or the tar does not end cleanly)", str(tar),
                                "set reorganize_tar.count_from: auto (or scan) to count from the tar headers")
        hit = old.get(str(tar))
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            out[i] = Counted(hit[2], "scan", tuple(hit[3]) if hit[3] else None)
        else:
            to_scan.append(i)
    if to_scan:
        threads = cfg.scan_threads or scan_threads_for(filesystem_type(tars[0]))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = pool.map(lambda i: _scan_count(str(tars[i]), sel), to_scan)
            for i, c in zip(to_scan, found, strict=True):
                out[i] = c
    fresh = {str(t): [st.st_size, st.st_mtime_ns, c.count, list(c.key_range) if c.key_range else None]
             for t, st, c in zip(tars, stats, out, strict=True) if c is not None and c.source == "scan"}
    if fresh != old:
        try:  # only a speed-up: Slurm array tasks planning at once may race on it
            write_text_atomic(cache_path, json.dumps({"version": [VERSION, COUNT_RULES], "selection": sig,
                                                      "tars": fresh}))
        except OSError:
            pass
    return [c for c in out if c is not None]


def first_duplicate(key_ranges: Mapping[str, tuple[str, str]],
                    keys_of: Callable[[str], Iterable[str]]) -> tuple[str, str, str] | None:
    """(key, tar_a, tar_b) for a key found in two tars, else None. Only tars whose key ranges overlap
    are read, so disjoint ranges (img2dataset's shard-prefixed keys) cost nothing; overlapping ones
    are compared by 64-bit key hashes (8 bytes a key, not a dict of strings), then confirmed."""
    ordered = sorted(key_ranges.items(), key=lambda kv: (kv[1][0], kv[0]))
    clusters: list[list[str]] = []
    high = ""
    for tar, (lo, hi) in ordered:
        if clusters and lo <= high:
            clusters[-1].append(tar)
            high = max(high, hi)
        else:
            clusters.append([tar])
            high = hi
    for group in clusters:
        if len(group) < 2:
            continue
        hashes = [np.fromiter((hash(k) for k in keys_of(tar)), dtype=np.int64) for tar in group]
        owner = np.repeat(np.arange(len(group)), [len(h) for h in hashes])
        flat = np.concatenate(hashes)
        order = np.argsort(flat, kind="stable")
        flat, owner = flat[order], owner[order]
        same = np.nonzero((flat[1:] == flat[:-1]) & (owner[1:] != owner[:-1]))[0]
        for a, b in sorted({(int(owner[i]), int(owner[i + 1])) for i in same}):
            common = set(keys_of(group[a])) & set(keys_of(group[b]))
            if common:  # not just a hash collision
                return min(common), group[a], group[b]
    return None


def _duplicate_error(dup: tuple[str, str, str]) -> PrepError:
    key, a, b = dup
    return PrepError(f"sample key {key!r} is in two input tars: {a} and {b}", NAME,
                     "give samples globally unique keys (e.g. prefix each part's keys) or remove one copy")


# ----------------------------------------------------------------------------------------------- stage


def _dirs(root: PrepConfig) -> tuple[Path, Path]:
    cfg: Config = root.reorganize_tar
    if cfg.input_dir is None:
        raise PrepError("reorganize_tar.input_dir is not set", "config",
                        "set reorganize_tar.input_dir or dataset_output_root")
    if cfg.output_dir is None:
        raise PrepError("reorganize_tar.output_dir is not set", "config",
                        "set reorganize_tar.output_dir or dataset_output_root")
    inp, out = Path(cfg.input_dir).resolve(), Path(cfg.output_dir).resolve()
    if out == inp or inp in out.parents:
        raise PrepError(f"output_dir {out} is inside input_dir {inp}", "config reorganize_tar.output_dir",
                        "write the repacked shards to a folder outside the raw tars")
    return inp, out


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_dirs(root)[1]]


def shard_name(j: int, n_shards: int) -> str:
    return f"{j:0{max(6, len(str(n_shards - 1)))}d}.tar"


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    cfg: Config = root.reorganize_tar
    inp, out = _dirs(root)
    tars = shard_folder(inp, "set reorganize_tar.input_dir to the folder of raw tars "
                        "(download_images.output_dir)")
    if not tars:
        raise PrepError("no .tar files found", str(inp),
                        "point reorganize_tar.input_dir at img2dataset's output")
    sel = Selection.of(cfg)
    counted = count_inputs(tars, cfg, sel, out / ".prep" / COUNTS_CACHE)
    scanned = {str(t): c.key_range for t, c in zip(tars, counted, strict=True) if c.key_range}
    if len(scanned) == len(tars):
        dup = first_duplicate(scanned, lambda t: (s.key for s in scan_input(t, sel, evict=False).usable))
        if dup:
            raise _duplicate_error(dup)
    counts = [c.count for c in counted]
    total = sum(counts)
    if total == 0:
        raise PrepError(f"the {len(tars)} input tar(s) hold no usable samples", str(inp),
                        "check the download, or file_ext_in_tar (every listed extension is required)")
    shards = layout(counts, cfg.tar_chunk_size, cfg.tail)
    if not shards:
        raise PrepError(f"only {total} usable samples, fewer than tar_chunk_size={cfg.tar_chunk_size}, and "
                        "tail: drop would drop them all", "config reorganize_tar.tail",
                        "use tail: keep or fill, or a smaller tar_chunk_size")
    cum = [0]
    for n in counts:
        cum.append(cum[-1] + n)
    reports: dict[int, list[int]] = {}
    for i in range(len(tars)):
        reports.setdefault(reporter_of(cum[i], cfg.tar_chunk_size, len(shards)), []).append(i)

    def describe(i: int) -> dict[str, Any]:
        st = tars[i].stat()
        return {"tar": str(tars[i]), "rel": tars[i].relative_to(inp).as_posix(), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "count": counts[i], "counted_by": counted[i].source}

    tasks: list[Task] = []
    for j, sp in enumerate(shards):
        used = sorted({s[0] for s in sp.segments} | {s[0] for s in sp.tail_dropped} | set(reports.get(j, [])))
        name = shard_name(j, len(shards))
        dest = out / name
        payload = {"shard": name, "out": str(dest), "selection": sel.to_json(),
                   "inputs": {str(i): describe(i) for i in used},
                   "segments": [list(s) for s in sp.segments],
                   "tail_dropped": [list(s) for s in sp.tail_dropped],
                   "report": reports.get(j, [])}
        weight = sum(b - a for _, a, b, _ in sp.segments)
        tasks.append(Task(name, payload, (str(dest), str(index_path(dest))), weight))
    return tasks


def _member_data(path: str, samples: list[Sample], sel: Selection) -> list[dict[str, MemberData]]:
    """Each sample's kept members, as FileSlices the writer copies straight from the input. Samples not
    in file order (img2dataset writes them as downloads finish) are first asked of the kernel in file
    order, so the input is still read sequentially and the writer's reads in key order hit the cache."""
    if not all(a.offset < b.offset for a, b in itertools.pairwise(samples)):
        _prefetch(path, samples)
    if sel.keep is None:  # every member (the writer sorts them)
        return [{e: FileSlice(path, m.data_offset, m.size) for e, m in s.members.items()} for s in samples]
    return [{e: FileSlice(path, s.members[e].data_offset, s.members[e].size) for e in sel.members(s)}
            for s in samples]


def _prefetch(path: str, samples: list[Sample]) -> None:
    """Start reading the samples' bytes into the page cache, in file order: one request per cluster of
    samples at most READ_GAP apart. Returns at once; a no-op where posix_fadvise does not exist."""
    if not hasattr(os, "posix_fadvise"):
        return
    spans = sorted((s.offset, s.end) for s in samples)
    fd = os.open(path, os.O_RDONLY)
    try:
        start, end = spans[0]
        for a, b in spans[1:]:
            if a - end > READ_GAP:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                start = a
            end = max(end, b)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    with gc_paused():  # a task makes a few records per member, none cyclic
        return _run_task(task, root)


def _run_task(task: Task, root: PrepConfig) -> TaskResult:
    p = task.payload
    dest = Path(p["out"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    sel = Selection.from_json(p["selection"])
    inputs: dict[str, dict[str, Any]] = p["inputs"]
    scans: dict[str, InputScan] = {}
    for i, meta in inputs.items():
        st = os.stat(meta["tar"])
        if (st.st_size, st.st_mtime_ns) != (meta["size"], meta["mtime_ns"]):
            raise PrepError("input tar changed after the plan was made", meta["tar"],
                            "re-run the stage (it plans again from the current inputs)")
        s = scans[i] = scan_input(meta["tar"], sel)
        if len(s.usable) != meta["count"]:
            how = "img2dataset's _stats.json" if meta["counted_by"] == "stats" else "an earlier scan"
            raise PrepError(f"planned {meta['count']} usable samples (from {how}) but the tar has "
                            f"{len(s.usable)}", meta["tar"],
                            "the input changed while planning, or its stats are wrong: re-run the stage "
                            "(set reorganize_tar.count_from: scan if the stats are wrong)")

    samples: list[tuple[str, dict[str, MemberData]]] = []
    owner: dict[str, str] = {}
    key_ranges: dict[str, list[str]] = {}
    filled = 0
    for i, a, b, suffix in p["segments"]:
        meta, chosen = inputs[str(i)], scans[str(i)].usable[a:b]
        tar = meta["tar"]
        keys = [s.key + suffix for s in chosen]  # unique within one input (its scan made sure)
        if not owner.keys().isdisjoint(keys):
            key = next(k for k in keys if k in owner)
            raise _duplicate_error((key, owner[key], tar))
        owner.update(dict.fromkeys(keys, tar))
        samples.extend(zip(keys, _member_data(tar, chosen, sel), strict=True))
        if suffix:
            filled += len(chosen)
        elif chosen:
            lo, hi = key_ranges.setdefault(tar, [chosen[0].key, chosen[-1].key])
            key_ranges[tar] = [min(lo, chosen[0].key), max(hi, chosen[-1].key)]
    fields = Counter(itertools.chain.from_iterable(members for _, members in samples))  # one pass, in C
    info = write_shard(dest, samples, fsync=root.reorganize_tar.fsync)
    write_index(dest, info.offsets)

    counts = {"shards_out": 1, "samples_out": len(samples) - filled, "samples_filled": filled,
              "bytes_out": info.bytes, "inputs_read": len(inputs), "samples_in": 0, "damaged_tars": 0,
              "inputs_empty": 0}
    dropped: Counter[str] = Counter()
    notes: list[str] = []
    dropped_keys: list[list[str]] = []
    for i in p["report"]:
        meta, s = inputs[str(i)], scans[str(i)]
        counts["samples_in"] += len(s.scan.samples)
        for key, why in s.dropped:
            dropped[why] += 1
            dropped_keys.append([meta["rel"], key, why])
        if s.scan.error is not None:
            counts["damaged_tars"] += 1
            err = s.scan.error
            notes.append(f"{meta['rel']}: damaged at byte {err.offset} ({err.what}); kept the "
                         f"{len(s.scan.samples)} whole samples before it, the rest is not read — fix: "
                         f"{err.fix}")
        if not s.scan.samples:
            counts["inputs_empty"] += 1
            if s.scan.error is None:  # a damaged one is named above
                notes.append(f"{meta['rel']}: holds no samples (a tar of end blocks only)")
    for i, a, b in p["tail_dropped"]:
        meta, chosen = inputs[str(i)], scans[str(i)].usable[a:b]
        dropped["tail: drop"] += len(chosen)
        dropped_keys += [[meta["rel"], s.key, "tail: drop"] for s in chosen]
    if p["tail_dropped"]:
        notes.append(f"tail: drop dropped the last {dropped['tail: drop']} samples (keys "
                     f"{dropped_keys[-dropped['tail: drop']][1]} … {dropped_keys[-1][1]})")
    if filled:
        notes.append(f"tail: fill filled the short last shard {p['shard']} with {filled} copies of the first "
                     "samples (keys suffixed _fillN)")
    return TaskResult(
        task.id, counts=counts, dropped=dict(dropped), notes=notes,
        data={"shard": p["shard"], "samples": len(samples), "bytes": info.bytes, "checksum": info.checksum,
              "fields": dict(fields), "key_ranges": key_ranges, "dropped_keys": dropped_keys},
        outputs={str(dest): {"bytes": info.bytes, "checksum": info.checksum}},
    )


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    """Check keys are unique across inputs, apply `strict`, write manifest.json and the drop report."""
    cfg: Config = root.reorganize_tar
    _, out = _dirs(root)
    sel = Selection.of(cfg)
    ranges_by_tar: dict[str, tuple[str, str]] = {}
    for r in results:
        for tar, (lo, hi) in r.data["key_ranges"].items():
            old = ranges_by_tar.get(tar)
            ranges_by_tar[tar] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    dup = first_duplicate(ranges_by_tar, lambda t: (s.key for s in scan_input(t, sel).usable))
    if dup:
        raise _duplicate_error(dup)
    damaged = sum(r.counts.get("damaged_tars", 0) for r in results)
    if damaged and (cfg.strict or opts.strict):
        raise PrepError(f"{damaged} input tar(s) are truncated or corrupt (their samples before the damage "
                        "were repacked; see the notes for byte offsets)", NAME,
                        "re-download those tars, or drop strict to accept the loss")

    fields: Counter[str] = Counter()
    for r in results:
        fields.update(r.data["fields"])
    entries = [ShardEntry(r.data["shard"], r.data["samples"], r.data["bytes"], r.data["checksum"])
               for r in results]
    history = [{"stage": NAME, "tar_chunk_size": cfg.tar_chunk_size, "tail": cfg.tail,
                "file_ext_in_tar": list(sel.required), "keep_other_members": cfg.keep_other_members}]
    manifest = Manifest(entries, {e: {"samples": n} for e, n in sorted(fields.items())}, {}, history,
                        cfg.tar_chunk_size)
    write_manifest(out, manifest)
    dropped = [row for r in results for row in r.data["dropped_keys"]]
    report = out / ".prep" / DROPPED_REPORT
    write_text_atomic(report, "".join(json.dumps({"tar": t, "key": k, "reason": why}) + "\n"
                                      for t, k, why in sorted(dropped)))

    notes: list[str] = []
    total = manifest.total_samples
    short = [e for e in entries if e.samples != cfg.tar_chunk_size]
    notes.append(f"wrote {len(entries)} shards, {total} samples, tar_chunk_size {cfg.tar_chunk_size}"
                 + (f"; one short last shard {short[0].path} with {short[0].samples} samples (tail: keep)"
                    if short else "; every shard is full"))
    if dropped:
        first = ", ".join(f"{t}:{k} ({why})" for t, k, why in sorted(dropped)[:KEYS_NAMED])
        notes.append(f"{len(dropped)} samples dropped (first: {first}); every key and reason is in {report}")
    if damaged:
        notes.append(f"WARNING: {damaged} damaged input tar(s); strict: true (or --strict) fails on this")
    return notes + unplanned_shards_warning(out, {e.path for e in entries}, recursive=False)
