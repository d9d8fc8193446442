"""Remote shards through the shard cache vs the same shards read locally (issue 19, part 2).

Data: N samples of 256x256 JPEG (q90, ~18 KiB) + txt + json in S shards (default 25,600 in 128, ~540 MB),
shuffled in windows of 4 shards (every case), so a cold cache must keep downloading while it is read.
A loopback HTTP server (`prep.testing.servers.serve_files`, in its own process, sending by `sendfile`)
adds `--latency` per request (default 20 ms) and shares a link of `--bandwidth` bytes/s among all
responses (default 1 GB/s, a 10 GbE node's share of a store). prep's DataLoader (2 workers, batch 32,
shuffled, decode='raw': raw throughput, nothing else in the way) reads, each case in a fresh process,
the cases in a new random order every round:
- local: the shard folder on disk (the baseline);
- ranged: the URL, one ranged request per sample (no cache);
- cache cold: the URL through an empty shard cache (whole shards, read ahead in the planned order);
- cache warm: the same cache, now holding every shard (a second epoch, or a resumed run);
- cache small: an empty cache limited to 30% of the data (LRU eviction at work).
And, as the ceiling a cold epoch cannot pass, "download alone": every shard fetched into an empty cache
by 12 threads of one process (the loader's read-ahead: 2 workers x 6), nothing read (the link through
this server, in samples/s).

Each figure is one epoch: raw throughput after the first batch (samples/s), the CPU time of the loader's
processes per sample (the server's excluded), and the time from opening the dataset to the first batch;
medians of `--repeats` rounds. The target: cache cold >= 0.8 x local.

On a 2-core machine the server, the downloads and the reading share the cores, and raw reading alone
keeps both busy: a cold epoch pays its downloads' CPU out of the reading's (see the CPU column).

Run: `PYTHONPATH=src python bench/remote_cache.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import Measure, machine, record

BATCH, WORKERS = 32, 2
WINDOW = 4  # shards per shuffle window: the cache reads the next windows while this one is read
SERVER = """
import sys, time
from prep.testing.servers import serve_files
with serve_files(sys.argv[1], latency=float(sys.argv[2]), bandwidth=float(sys.argv[3]) or None) as srv:
    print(srv.url, flush=True)
    sys.stdin.read()
"""
EPOCH = """
import json, resource, sys, time
from prep.loaders import DataLoader, ShardDataset
def cpu():
    return sum(x for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for x in resource.getrusage(w)[:2])
kw = json.loads(sys.argv[2])
t0 = time.perf_counter()
ds = ShardDataset(sys.argv[1], batch_size=BATCH, seed=0, decode="raw", rank=0, world_size=1,
                  window_shards=WINDOW, **kw)
batches = iter(DataLoader(ds, num_workers=WORKERS))
next(batches)
t1, c1 = time.perf_counter(), cpu()
n = sum(len(b["__key__"]) for b in batches)
t2 = time.perf_counter()
del batches  # the workers exit and are reaped: their CPU is counted
print(json.dumps([n / (t2 - t1), t1 - t0, (cpu() - c1) / n * 1e6]))
""".replace("BATCH", str(BATCH)).replace("WINDOW", str(WINDOW)).replace("WORKERS", str(WORKERS))
DOWNLOAD = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from prep.loaders.io.cache import ShardCache, release
from prep.loaders.io.sources import ShardReader, resolve_shards
specs = resolve_shards(sys.argv[1])
reader = ShardReader(specs, cache=ShardCache(sys.argv[2], 10**12))
t0, c0 = time.perf_counter(), time.process_time()
with ThreadPoolExecutor(12) as pool:  # as many downloads as the loader's read-ahead: 2 workers x 6
    for fd in pool.map(reader._cache_fd, range(len(specs))):
        release(fd)
n = sum(s.samples for s in specs)
print(json.dumps([n / (time.perf_counter() - t0), 0.0, (time.process_time() - c0) / n * 1e6]))
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


def run_case(code: str, *args: str) -> tuple[float, float, float]:
    """(samples/s, first batch s, CPU µs per sample of the loader's processes after the first batch), in a
    fresh process."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"a case failed:\n{out.stderr[-2000:]}")
    rate, first, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return rate, first, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=25600)
    ap.add_argument("--shards", type=int, default=128)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each response")
    ap.add_argument("--bandwidth", type=float, default=1e9, help="bytes/s shared by all responses (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.shards, args.repeats = 3200, 16, 1
    tmp = Path(tempfile.mkdtemp(prefix="prep-bench-cache-"))
    env_path = str(Path(__file__).resolve().parent.parent / "src")
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        data = make_data(tmp / "ds", args.samples, args.shards)
        size = sum(p.stat().st_size for p in data.glob("*.tar"))
        cmd = [sys.executable, "-c", SERVER, str(tmp), str(args.latency), str(args.bandwidth)]
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().strip() + "/ds"  # type: ignore[union-attr]
            names = ("local", "ranged", "cache cold", "cache warm", "cache small", "download alone")
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
            rng = random.Random(0)
            for r in range(args.repeats):
                cache, small, alone = (str(tmp / f"{k}{r}") for k in ("cache", "small", "alone"))
                cases = {
                    "local": (str(data), {}),
                    "ranged": (url, {}),
                    "cache cold": (url, {"cache_dir": cache, "cache_bytes": 2 * size}),
                    "cache small": (url, {"cache_dir": small, "cache_bytes": size * 3 // 10}),
                }
                order = [*cases, "download alone"]
                rng.shuffle(order)
                for name in order:
                    if name == "local":  # pages cached, like a just-filled cache's (the VM evicts idle ones)
                        for shard in sorted(data.glob("*.tar")):
                            shard.read_bytes()
                    if name == "download alone":
                        results[name].append(run_case(DOWNLOAD, url, alone))
                        continue
                    source, kw = cases[name]
                    results[name].append(run_case(EPOCH, source, json.dumps(kw)))
                    if name == "cache cold":  # the same cache, now full: the second epoch
                        results["cache warm"].append(run_case(EPOCH, source, json.dumps(kw)))
                for folder in (cache, small, alone):
                    shutil.rmtree(folder, ignore_errors=True)
        finally:
            server.stdin.close()  # type: ignore[union-attr]
            server.wait(timeout=30)
        report(args, size, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, size: int, results: dict[str, list[tuple[float, float, float]]]) -> None:
    per_sample = size / args.samples
    link = f"{args.bandwidth / 1e6:.0f} MB/s" if args.bandwidth else "no limit"
    data = (f"{args.samples:,} samples, {args.shards} shards, {size / 1e6:.0f} MB; latency "
            f"{args.latency * 1e3:.0f} ms/request; link {link}; {WORKERS} workers, batch {BATCH}, raw")
    print(data)
    print(f"machine: {machine().get('cpu', '?')}; medians of {args.repeats}")
    local = statistics.median(r for r, _, _ in results["local"])
    print(f"{'case':<15} {'samples/s':>10} {'x local':>8} {'MB/s':>7} {'CPU us/sample':>14} "
          f"{'first batch':>12}")
    for name, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        first = statistics.median(f for _, f, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        cpu_text = f"{cpu:>14.0f}" if cpu else f"{'':>14}"
        first_text = f"{first:>11.2f}s" if first else f"{'':>12}"
        print(f"{name:<15} {rate:>10.0f} {rate / local:>8.2f} {rate * per_sample / 1e6:>7.0f} {cpu_text} "
              f"{first_text}")
    record("remote_cache", "Remote shards through the shard cache vs local", data,
           [Measure("raw epoch", name, "samples/s", [r for r, _, _ in runs], higher_is_better=True)
            for name, runs in results.items()],
           notes=["cache cold / local is the figure asked for (>= 0.8); download alone is the link's "
                  "ceiling through this server"])


if __name__ == "__main__":
    main()
