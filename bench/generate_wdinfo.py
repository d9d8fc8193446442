"""Indexing a shard folder: prep vs Megatron-Energon, in the same run.

Two comparisons on the same generated shards (medians of 3):
- header scan of every shard: `prep.formats.tar.scan_tar` vs a `tarfile` walk (what energon's indexer does);
- the whole job: `prep run generate_wdinfo` (CLI start-up, `.idx`, XXH3 checksum of every byte, manifest,
  wdinfo, .nv-meta) vs energon's `WebdatasetPreparator.prepare_dataset(workers=1)` (`.idx`, sqlite index,
  info).

    python bench/generate_wdinfo.py [--shards 20] [--samples 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _report import Measure, record  # bench/ is on the path when a script runs
from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard


def make_shards(folder: Path, shards: int, per: int) -> list[Path]:
    folder.mkdir(parents=True)
    for s in range(shards):
        samples = [(f"{s:03d}{i:06d}", {"jpg": os.urandom(5000), "txt": b"a caption " * 5, "json": b"{}"})
                   for i in range(per)]
        write_shard(folder / f"shard-{s:03d}.tar", samples, fsync=False)
    return sorted(folder.glob("*.tar"))


def times_of(fn: Callable[[], float | None], runs: int = 3) -> list[float]:
    """Seconds of each run (the function's own figure when it returns one)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        took = fn()
        times.append(took if took is not None else time.perf_counter() - start)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=20, help="shards to generate (default 20)")
    ap.add_argument("--samples", type=int, default=1000, help="samples per shard (default 1000)")
    args = ap.parse_args()
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    with tempfile.TemporaryDirectory(prefix="prep-bench-wdinfo-") as tmp:
        root = Path(tmp)
        tars = make_shards(root / "src", args.shards, args.samples)
        size = sum(p.stat().st_size for p in tars)

        def prep_scan() -> None:
            for p in tars:
                scan_tar(p)

        def tarfile_walk() -> None:
            for p in tars:
                with open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as t:
                    for _ in t:
                        pass

        def fresh_copy(name: str) -> Path:
            d = root / name
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(root / "src", d)
            return d

        def prep_job() -> float:
            d = fresh_copy("prep")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "prep.cli", "run", "generate_wdinfo", "-q", "--set",
                            f"generate_wdinfo.input_dir={d}"], check=True, capture_output=True)
            return time.perf_counter() - start

        def energon_job() -> float:
            d = fresh_copy("energon")
            start = time.perf_counter()
            WebdatasetPreparator.prepare_dataset(d, [p.name for p in tars],
                                                 split_parts_ratio=[("train", 1.0)], workers=1)
            return time.perf_counter() - start

        runs = {"scan": (times_of(prep_scan), times_of(tarfile_walk)),
                "job": (times_of(prep_job), times_of(energon_job))}
    ours_scan, peer_scan = (statistics.median(t) for t in runs["scan"])
    ours_job, peer_job = (statistics.median(t) for t in runs["job"])
    data = (f"{args.shards} shards x {args.samples} samples x 3 members (jpg 5 KB, txt, json), "
            f"{size / 1e6:.0f} MB, in the page cache; 3 runs each")
    record("generate_wdinfo", "Indexing a shard folder: prep vs Megatron-Energon", data, [
        Measure("header scan of every shard", "prep", "s", runs["scan"][0]),
        Measure("header scan of every shard", "tarfile walk (energon's indexer)", "s", runs["scan"][1]),
        Measure("index a folder (the whole job)", "prep", "s", runs["job"][0]),
        Measure("index a folder (the whole job)", "energon prepare_dataset", "s", runs["job"][1]),
    ], ["prep's job includes CLI start-up, an XXH3 checksum of every byte, manifest.json, wdinfo.pkl and "
        ".nv-meta/; energon's writes .idx, its sqlite index and .info.json"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; data: {args.shards} shards x "
          f"{args.samples} samples x 3 members, {size / 1e6:.0f} MB (page cache); medians of 3")
    print(f"header scan: prep scan_tar {ours_scan:.3f} s | tarfile walk (energon's indexer) "
          f"{peer_scan:.3f} s | prep is {peer_scan / ours_scan:.2f}x faster")
    print(f"index a folder: prep run generate_wdinfo {ours_job:.2f} s | energon prepare_dataset "
          f"{peer_job:.2f} s | prep is {peer_job / ours_job:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
