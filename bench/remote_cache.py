"""Remote shards through the shard cache vs the same shards read locally (issue 19, part 2).

Data: N samples of 256x256 JPEG (q90, ~18 KiB) + txt + json in S shards (default 6,400 in 32, ~130 MB),
shuffled in windows of 4 shards (every case), so a cold cache must keep downloading while it is read.
A loopback HTTP server (`prep.testing.servers.serve_files`, in its own process) adds `--latency` per
request (default 20 ms) and shares a link of `--bandwidth` bytes/s among all responses. prep's
DataLoader (2 workers, batch 32, shuffled, decode='raw': raw throughput, nothing else in the way) reads:
- local: the shard folder on disk (the baseline);
- ranged: the URL, one ranged request per sample (no cache: what remote reads were before the cache);
- cache cold: the URL through an empty shard cache (whole shards, read ahead in the planned order);
- cache warm: the same cache, now holding every shard (a resumed or second-epoch run);
- cache small: an empty cache limited to 30% of the data (room for ~10 of the 32 shards: the window
  being read and the one read ahead, 8 shards, fit; LRU eviction at work).
Each figure is one epoch: raw throughput after the first batch (samples/s) and the time from opening the
dataset to the first batch (start-up: resolving, workers, index reads), medians of `--repeats` runs.
The ratio asked for is
cache cold / local >= 0.8 (with the link faster than the loader's local rate, else the link bounds it:
see `link` in the table).

Run: `PYTHONPATH=src python bench/remote_cache.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, WORKERS = 32, 2
WINDOW = 4  # shards per shuffle window: the cache reads the next windows while this one is read
SERVER = """
import sys, time
from prep.testing.servers import serve_files
with serve_files(sys.argv[1], latency=float(sys.argv[2]), bandwidth=float(sys.argv[3]) or None) as srv:
    print(srv.url, flush=True)
    sys.stdin.read()
"""


def make_data(root: Path, samples: int, shards: int) -> Path:
    from prep.formats.index import write_index
    from prep.formats.manifest import Manifest, ShardEntry, write_manifest
    from prep.formats.tar_write import write_shard
    from prep.testing.loader_data import jpeg_bytes

    images = [jpeg_bytes(i, 256, 90, noise=7.5) for i in range(200)]
    per = samples // shards
    entries = []
    for s in range(shards):
        rows = []
        for r in range(per):
            key = f"s{s:05d}_{r:06d}"
            rows.append((key, {"jpg": images[(s * per + r) % len(images)], "txt": f"caption {key}".encode(),
                               "json": json.dumps({"key": key}).encode()}))
        name = f"shard-{s:05d}.tar"
        info = write_shard(root / name, rows, fsync=False)
        write_index(root / name, info.offsets)
        entries.append(ShardEntry(name, per, (root / name).stat().st_size, ""))
    write_manifest(root, Manifest(entries))
    return root


def epoch_rate(source: str, **kw) -> tuple[float, float]:
    """(samples/s after the first batch, seconds from opening the dataset to the first batch)."""
    from prep.loaders import DataLoader, ShardDataset

    t0 = time.perf_counter()
    kw.setdefault("window_shards", WINDOW)
    ds = ShardDataset(source, batch_size=BATCH, seed=0, decode="raw", rank=0, world_size=1, **kw)
    batches = iter(DataLoader(ds, num_workers=WORKERS))
    next(batches)
    t1 = time.perf_counter()
    n = sum(len(b["__key__"]) for b in batches)
    return n / (time.perf_counter() - t1), t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6400)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--bandwidth", type=float, default=400e6, help="bytes/s shared by all responses")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.shards, args.repeats = 1600, 8, 1
    tmp = Path(tempfile.mkdtemp(prefix="prep-bench-cache-"))
    try:
        data = make_data(tmp / "ds", args.samples, args.shards)
        size = sum(p.stat().st_size for p in data.glob("*.tar"))
        cmd = [sys.executable, "-c", SERVER, str(tmp), str(args.latency), str(args.bandwidth)]
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().strip() + "/ds"  # type: ignore[union-attr]
            names = ("local", "ranged", "cache cold", "cache warm", "cache small")
            results: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
            for r in range(args.repeats):
                cache, small = tmp / f"cache{r}", tmp / f"small{r}"
                results["local"].append(epoch_rate(str(data)))
                results["ranged"].append(epoch_rate(url))
                results["cache cold"].append(epoch_rate(url, cache_dir=cache, cache_bytes=2 * size))
                results["cache warm"].append(epoch_rate(url, cache_dir=cache, cache_bytes=2 * size))
                results["cache small"].append(epoch_rate(url, cache_dir=small, cache_bytes=size * 3 // 10))
                shutil.rmtree(cache)
                shutil.rmtree(small)
        finally:
            server.stdin.close()  # type: ignore[union-attr]
            server.wait(timeout=30)
        per_sample = size / args.samples
        print(f"data: {args.samples} samples, {args.shards} shards, {size / 1e6:.0f} MB; latency "
              f"{args.latency * 1e3:.0f} ms/request; link {args.bandwidth / 1e6:.0f} MB/s "
              f"(= {args.bandwidth / per_sample:.0f} samples/s); {WORKERS} workers, batch {BATCH}, raw")
        local = statistics.median(r for r, _ in results["local"])
        for name, runs in results.items():
            rate, first = statistics.median(r for r, _ in runs), statistics.median(f for _, f in runs)
            print(f"{name:<12} {rate:>9.0f} samples/s  {rate / local:>5.2f} x local   "
                  f"first batch {first:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
