"""reorganize_tar benchmark: repack uneven img2dataset-like tars into equal shards, against `cat` of the
same files (to /dev/null, and to disk with and without fsync) in the same run. `cat` copies inside the
kernel (copy_file_range: the bytes never reach user space); a read+write copy through a 256 KiB buffer,
what any tool that looks at the bytes must at least do, is timed beside it.

Data: tars as img2dataset writes them (webdataset's TarWriter: a pax header with the float mtime
before every member, members in extension order, `NNNNN_stats.json` beside each tar), 0..2*mean samples
each, of jpg (random bytes, `--jpg-kb`, default 8-120 KB) + json + txt, `--size` MB in all (default
300 MB; the issue's target figure is 2 GB: `--size 2048`). Samples are in key order; `--shuffled`
writes them in download order as img2dataset does when downloads finish out of order. `--no-stats`
leaves the stats out, so the plan scans every input's headers.
reorganize_tar runs in-process (plan + tasks + manifest) as `prep run` does in a fresh process: the
input header scans are not cached between runs (the `scans cached` rows show the repack alone in
one worker; pool workers start as fresh processes and scan their own inputs).
Shards are fsynced (the default) except in the `fsync: false` row. Every figure is the median of
`--repeats` rounds (each runs every configuration once, in a shuffled order); all reads come from the
page cache (the inputs were just written, and every run reads them), for the peers as for prep.
CPU s/GB counts every thread and child process; "machine busy" is the share of all CPUs busy during
the run, kernel writeback threads included (100% = every core saturated).
Target: >= 0.7 of cat-to-disk at 1 worker, and near-linear scaling to 2 workers (on a machine with 2
free cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import webdataset as wds

from _report import Measure, record  # bench/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prep.config import load_config  # noqa: E402
from prep.formats.checksum import file_checksum  # noqa: E402
from prep.runtime.runner import run_stage  # noqa: E402
from prep.stages import reorganize_tar  # noqa: E402
from prep.stages.base import RunOptions  # noqa: E402


def make_inputs(folder: Path, size_mb: int, shuffled: bool, jpg_kb: tuple[int, int] = (8, 120),
                seed: int = 0, stats: bool = True) -> tuple[list[Path], int]:
    """Uneven tars totalling ~size_mb MB, written as img2dataset writes them (webdataset's TarWriter: a
    pax header with the float mtime before every member) with its `NNNNN_stats.json` beside each tar
    unless `stats` is False; returns the tars and their total bytes."""
    rng = random.Random(seed)
    blob = rng.randbytes(jpg_kb[1] * 1000 + 1)  # sliced per sample: generation stays fast, bytes differ
    target, written, t = size_mb * 1_000_000, 0, 0
    tars: list[Path] = []
    while written < target:
        n = rng.randint(0, 2 * 150)
        keys = [f"{t:05d}{i:04d}" for i in range(n)]
        if shuffled:
            rng.shuffle(keys)
        path = folder / f"part{t // 50:03d}" / f"{t:05d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path)) as tw:
            for key in keys:
                size = rng.randint(jpg_kb[0] * 1000, jpg_kb[1] * 1000)
                start = rng.randint(0, len(blob) - size)
                tw.write({"__key__": key, "jpg": key.encode() + blob[start:start + size],
                          "txt": f"a photo number {key}",
                          "json": json.dumps({"key": key, "status": "success"})})
        if stats:
            path.with_name(f"{t:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
        written += path.stat().st_size
        tars.append(path)
        t += 1
    return tars, written


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its finished children (cat, pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat: kernel threads (writeback) included, which no
    process's own CPU time shows."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def timed_rounds(configs: list[tuple[str, Callable[[], None], Callable[[], None]]],
                 repeats: int) -> dict[str, tuple[float, float, float, list[float]]]:
    """Median wall and CPU seconds of each (name, run, prepare), the untimed `prepare` before each run,
    and the median share of the whole machine's CPUs busy during it, and every run's wall seconds.
    Runs go in rounds (every config once per round), so a slow spell of this shared VM, or memory it
    has to fault in again, falls on all of them, not on whichever config happened to run then. Each
    round runs them in another order (shuffled, seeded by the round): on a VM that hands freed memory
    back to its host (free page reporting), the writer that follows a large delete pays ~1 sys-s/GB to
    fault it in again, and that cost must not always fall on the config after the same neighbour.
    CPU time is the steadier figure: it does not grow with others' load."""
    walls: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    busy: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for r in range(repeats):
        order = list(configs)
        random.Random(r).shuffle(order)
        for name, run, prepare in order:
            prepare()
            start, cpu, (b0, t0) = time.perf_counter(), _cpu(), _machine_busy()
            run()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(_cpu() - cpu)
            b1, t1 = _machine_busy()
            busy[name].append((b1 - b0) / max(t1 - t0, 1))
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name]),
                   statistics.median(busy[name]), walls[name]) for name in walls}


def record_runs(runs: dict[str, tuple[float, float, float, list[float]]], mb: float, n_tars: int,
                args: argparse.Namespace) -> None:
    """For bench/REPORT.md: MB/s of every run; prep (1 worker) against the copies it is measured by."""
    def rates(name: str) -> list[float]:
        return [mb / w for w in runs[name][3]]

    pairs = [("repack, durable (fsync)", "prep reorganize_tar, 1 worker", ["cat > disk + fsync"]),
             ("repack, page cache", "prep, 1 worker, fsync: false", ["cat > disk", "read+write copy > disk"])]
    measures = []
    for task, ours, peers in pairs:
        if ours in runs:
            measures.append(Measure(task, "prep", "MB/s", rates(ours), True))
            measures += [Measure(task, peer, "MB/s", rates(peer), True) for peer in peers]
    measures += [Measure("other configurations", name, "MB/s", rates(name), True) for name in runs
                 if not any(name == ours or name in peers for _, ours, peers in pairs)]
    record("reorganize", "reorganize_tar: repacking uneven tars vs copying the same bytes",
           f"{n_tars} input tars, {mb:,.0f} MB, jpg {args.jpg_kb} KB + json + txt, tar_chunk_size "
           f"{args.chunk}, inputs in the page cache; {args.repeats} runs each, in shuffled rounds",
           measures, ["target: 1 worker >= 0.70 of the copy to disk"])


def cat_to(tars: list[Path], dest: str, fsync: bool) -> Callable[[], None]:
    def run() -> None:
        with open(dest, "wb") as out:
            subprocess.run(["cat", *map(str, tars)], stdout=out, check=True)
            if fsync:
                os.fsync(out.fileno())
    return run


def copy_through_user_space(tars: list[Path], dest: str) -> Callable[[], None]:
    """Every file read into a 256 KiB buffer and written out, as any tool that must see the bytes does
    (prep hashes them); `cat` instead copies inside the kernel (copy_file_range), never reading them."""
    def run() -> None:
        buf = bytearray(256 << 10)
        view = memoryview(buf)
        with open(dest, "wb", buffering=0) as out:
            for t in tars:
                with open(t, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        out.write(view[:n])
    return run


def hash_of(tars: list[Path], algorithm: str) -> Callable[[], None]:
    """Read and hash every file: xxh3_128 is the checksum prep's writer records for every shard (in its
    done-marker and manifest.json); sha256 shows why it is not sha256."""
    def run() -> None:
        for t in tars:
            file_checksum(t, algorithm)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=300, help="MB of input (default 300; the target is 2048)")
    ap.add_argument("--chunk", type=int, default=1000, help="tar_chunk_size (default 1000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    ap.add_argument("--shuffled", action="store_true", help="inputs in download order, not key order")
    ap.add_argument("--no-stats", action="store_true", help="no img2dataset _stats.json beside the tars, so "
                    "the plan counts samples by scanning every input's headers")
    ap.add_argument("--jpg-kb", default="8-120", help="range of jpg member sizes in KB (default 8-120; "
                    "LAION-style 256 px images are about 10-26)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="prep-bench-reorg-", dir=args.dir))
    try:
        raw, out, copy = work / "raw", work / "out", work / "copy.bin"
        lo, _, hi = args.jpg_kb.partition("-")
        tars, nbytes = make_inputs(raw, args.size, args.shuffled, (int(lo), int(hi or lo)),
                                   stats=not args.no_stats)
        mb = nbytes / 1e6
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}; filesystem of {work}")
        print(f"data: {len(tars)} input tars, {mb:,.0f} MB, jpg {args.jpg_kb} KB + json + txt, "
              f"{'download' if args.shuffled else 'key'} order, tar_chunk_size {args.chunk}; medians of "
              f"{args.repeats} runs, inputs in page cache\n")

        load = os.getloadavg()

        def rm_out() -> None:  # and no dirty pages left from the last run to slow this one's writes
            shutil.rmtree(out, ignore_errors=True)
            copy.unlink(missing_ok=True)
            os.sync()

        def fresh() -> None:  # as a new `prep run` process: no input scans cached from the last run
            rm_out()
            reorganize_tar._SCANS.items.clear()
            reorganize_tar._SCANS.samples = 0

        sets = [f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                f"reorganize_tar.tar_chunk_size={args.chunk}"]

        written: list[Path] = []  # the shards of the last prep run

        def repack(w: int, *extra: str) -> Callable[[], None]:
            cfg = load_config(None, [*sets, *extra])

            def run() -> None:
                result = run_stage("reorganize_tar", cfg, RunOptions(workers=w, quiet=True))
                if not result.ok:
                    raise SystemExit(f"reorganize_tar failed: {result.to_json()['errors'][:3]}")
                written[:] = list(out.glob("*.tar"))
            return run

        def cached() -> None:  # the input scans of an earlier run kept (inline tasks reuse them)
            if not reorganize_tar._SCANS.items:
                repack(1)()
            rm_out()

        configs = [("cat > /dev/null", cat_to(tars, os.devnull, False), rm_out),
                   ("cat > disk", cat_to(tars, str(copy), False), rm_out),
                   ("cat > disk + fsync", cat_to(tars, str(copy), True), rm_out),
                   ("read+write copy > disk", copy_through_user_space(tars, str(copy)), rm_out),
                   ("read + xxh3_128 (prep's checksum)", hash_of(tars, "xxh3_128"), rm_out),
                   ("read + sha256 (hashlib)", hash_of(tars, "sha256"), rm_out)]
        plural = {w: f"{w} worker{'s' if w > 1 else ''}" for w in args.workers}
        configs += [(f"prep reorganize_tar, {plural[w]}", repack(w), fresh) for w in args.workers]
        configs += [(f"prep, {plural[w]}, fsync: false", repack(w, "reorganize_tar.fsync=false"), fresh)
                    for w in args.workers]
        configs += [(f"prep, {plural[w]}, scans cached", repack(w), cached) for w in args.workers]
        runs = timed_rounds(configs, args.repeats)
        rates = {name: mb / wall for name, (wall, _, _, _) in runs.items()}
        shards = len(written)

        peer, disk = rates["cat > disk + fsync"], rates["cat > disk"]
        one = rates.get("prep reorganize_tar, 1 worker")
        print(f"load average before the timings: {load[0]:.1f} (this machine has {os.cpu_count()} CPUs)")
        print(f"{'what':<34}{'MB/s':>8}{'vs cat>disk+fsync':>19}{'vs cat>disk':>13}{'CPU s/GB':>10}"
              f"{'machine busy':>14}")
        for name, rate in rates.items():
            print(f"{name:<34}{rate:>8,.0f}{rate / peer:>19.2f}{rate / disk:>13.2f}"
                  f"{runs[name][1] / mb * 1000:>10.2f}{runs[name][2]:>14.0%}")
        record_runs(runs, mb, len(tars), args)
        if one:
            lazy = rates["prep, 1 worker, fsync: false"]
            user_copy = rates["read+write copy > disk"]
            print(f"\n1 worker, target >= 0.70 of the copy to disk: durable (prep fsyncs every shard) "
                  f"{one / peer:.2f} of cat>disk+fsync; page cache only (fsync: false) {lazy / disk:.2f} of "
                  f"cat>disk (which copies inside the kernel), {lazy / user_copy:.2f} of a read+write copy")
            for w in args.workers:
                if w > 1:
                    rate = rates[f"prep reorganize_tar, {w} workers"]
                    warm = rates[f"prep, {w} workers, scans cached"] / rates["prep, 1 worker, scans cached"]
                    cpu_bound = rates[f"prep, {w} workers, fsync: false"] / lazy
                    print(f"{w} workers / 1 worker: {rate / one:.2f} durable (the disk takes "
                          f"{peer:,.0f} MB/s: cat>disk+fsync), {cpu_bound:.2f} with fsync: false, {warm:.2f} "
                          f"with scans cached (linear = {w}; a task is a whole shard, {shards} here)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
