"""download_images benchmark: prep's stage vs plain img2dataset on the same loopback URL set.

Both download the same parquet part (N image URLs served from 127.0.0.1 by prep.testing.servers) with
the same img2dataset arguments (processes, threads, shard size, retries, timeout, resize_mode "no"),
into fresh folders, alternating which goes first. prep's time includes everything `prep run` does
for the task (plan, img2dataset, publishing shards with part-prefixed keys, stats). Reported: images/s
of each (successful images / wall seconds), medians of `--repeats`, the ratio prep/plain (target
>= 0.95), and the ratio within each back-to-back pair (robust to a shared machine's load drifting).
Both pay img2dataset's process start-up (spawned processes import torch, pandas, ...), which
dominates small runs: use a larger `--images` to measure steady-state throughput.

Run: `python bench/download_images.py` (default 2000 images of 256x256, 2 processes x 16 threads).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _report import Measure, record  # bench/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _settings(root: Path, inp: Path, a: argparse.Namespace) -> list[str]:
    return [f"dataset_output_root={root}", f"download_images.input_dir={inp}",
            f"download_images.download_num_processes={a.processes}",
            f"download_images.download_num_threads={a.threads}",
            f"download_images.number_sample_per_shard={a.per_shard}", "download_images.timeout=10"]


def run_plain(part: Path, out: Path, cfg) -> tuple[float, int]:
    """img2dataset.download exactly as a user would call it, with prep's arguments."""
    import json

    import img2dataset

    from prep.stages.download_images import img2dataset_args

    args = img2dataset_args(cfg)
    args["max_image_area"] = args["max_image_area"] or float("inf")
    args["max_aspect_ratio"] = args["max_aspect_ratio"] or float("inf")
    start = time.perf_counter()
    img2dataset.download(url_list=str(part), output_folder=str(out), input_format="parquet",
                         output_format="webdataset", number_sample_per_shard=cfg.number_sample_per_shard, **{
                             k: v for k, v in args.items() if k != "number_sample_per_shard"})
    seconds = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def run_prep(cfg) -> tuple[float, int]:
    from prep.runtime.runner import run_stage
    from prep.stages.base import RunOptions

    start = time.perf_counter()
    run = run_stage("download_images", cfg, RunOptions(quiet=True))
    seconds = time.perf_counter() - start
    if not run.ok:
        raise SystemExit(f"prep run failed: {run.to_json()['errors']}")
    return seconds, run.counts()["samples_out"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import pyarrow.parquet as pq

    from prep.config import load_config
    from prep.testing.servers import serve_images, url_table

    work = Path(tempfile.mkdtemp(prefix="prep-bench-dl-"))
    try:
        with serve_images() as srv:
            distinct = 64
            for seed in range(distinct):  # warm the server's image cache: time downloads, not generation
                urllib.request.urlopen(srv.good(a.size, a.size, seed)).read()
            rows = [(f"{srv.good(a.size, a.size, i % distinct)}?n={i}", f"image {i}")
                    for i in range(a.images)]
            inp = work / "parquet"
            inp.mkdir()
            part = inp / "bench.part0.parquet"
            pq.write_table(url_table(rows), part)
            nbytes = len(urllib.request.urlopen(srv.good(a.size, a.size, 0)).read())
            times: dict[str, list[float]] = {"img2dataset": [], "prep": []}
            counts: dict[str, int] = {}
            for r in range(a.repeats):
                order = ["img2dataset", "prep"] if r % 2 == 0 else ["prep", "img2dataset"]
                for who in order:
                    root = work / f"{who}-{r}"
                    cfg = load_config(None, _settings(root, inp, a)).download_images
                    if who == "prep":
                        seconds, ok = run_prep(load_config(None, _settings(root, inp, a)))
                    else:
                        seconds, ok = run_plain(part, root / "plain", cfg)
                    times[who].append(seconds)
                    counts[who] = ok
                    shutil.rmtree(root, ignore_errors=True)
                    print(f"  run {r + 1} {who:11s}: {ok} images in {seconds:.2f} s = "
                          f"{ok / seconds:,.1f} images/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: counts[k] / med[k] for k in med}
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"data: {a.images} URLs on 127.0.0.1, {a.size}x{a.size} JPEG (~{nbytes / 1024:.0f} KiB), "
          f"{a.processes} processes x {a.threads} threads, {a.per_shard} per shard, medians of {a.repeats}")
    print(f"peer img2dataset.download: {rate['img2dataset']:,.1f} images/s ({med['img2dataset']:.2f} s)")
    print(f"prep download_images:      {rate['prep']:,.1f} images/s ({med['prep']:.2f} s)")
    print(f"ratio prep / img2dataset: {rate['prep'] / rate['img2dataset']:.3f} (target >= 0.95)")
    paired = [(counts["prep"] / p) / (counts["img2dataset"] / i)
              for p, i in zip(times["prep"], times["img2dataset"], strict=True)]
    record("download_images", "Downloading images: prep download_images vs img2dataset.download",
           f"{a.images} URLs on 127.0.0.1, {a.size}x{a.size} JPEG (~{nbytes / 1024:.0f} KiB), "
           f"{a.processes} processes x {a.threads} threads, {a.per_shard} per shard, {a.repeats} runs each",
           [Measure("download a part", who, "images/s", [counts[who] / t for t in times[who]], True)
            for who in ("prep", "img2dataset")],
           [f"paired ratios prep / img2dataset: {', '.join(f'{r:.3f}' for r in paired)} (target >= 0.95)"])
    print(f"paired ratios (each repeat's two runs are back to back, so load drift cancels): "
          f"{', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}")


if __name__ == "__main__":  # img2dataset spawns processes, which re-import this module
    main()
