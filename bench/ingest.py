"""ingest_local benchmark: prep's stage vs img2dataset on a parquet of file:// URLs, the road users took
before the stage existed, on the same folder of images.

Both write tars of the same images with the same shard size and process count, into fresh folders,
alternating which goes first. prep keeps each image's bytes after a full decode check (Pillow);
img2dataset is run twice: as it comes (decodes and re-encodes every image to JPEG) and with
`disable_all_reencoding` (copies the bytes unchecked, the floor for any tool). Reported: images/s of
each (images written / wall seconds, process start-up included), medians of `--repeats`, and the
ratio prep / img2dataset per back-to-back pair. img2dataset's process start-up (its spawned workers
import torch, pandas, ...) dominates small runs: use a larger `--images` for steady-state throughput.

Run: `python bench/ingest.py` (default 2000 images of 256x256, a quarter PNG, 2 processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import Measure, record  # bench/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_folder(folder: Path, n: int, size: int) -> list[Path]:
    from prep.testing.servers import make_image

    paths = []
    for i in range(n):
        d = folder / f"d{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        png = i % 4 == 0
        path = d / f"img{i:06d}.{'png' if png else 'jpg'}"
        path.write_bytes(make_image(size, size, "png" if png else "jpeg", i))
        path.with_suffix(".txt").write_text(f"caption {i}")
        paths.append(path)
    return paths


def run_prep(folder: Path, out: Path, a: argparse.Namespace) -> tuple[float, int]:
    from rich.console import Console

    from prep.config import load_config
    from prep.runtime.runner import run_stage
    from prep.stages.base import RunOptions

    cfg = load_config(None, [f"dataset_output_root={out}", f"ingest_local.input_dir={folder}",
                             f"ingest_local.number_sample_per_shard={a.per_shard}"])
    start = time.perf_counter()
    run = run_stage("ingest_local", cfg, RunOptions(workers=a.processes, quiet=True), Console(quiet=True))
    seconds = time.perf_counter() - start
    if not run.ok:
        raise SystemExit(f"prep run failed: {run.to_json()['errors']}")
    return seconds, run.counts()["samples_out"]


def run_img2dataset(table: Path, out: Path, a: argparse.Namespace, reencode: bool) -> tuple[float, int]:
    import img2dataset

    start = time.perf_counter()
    img2dataset.download(url_list=str(table), output_folder=str(out), input_format="parquet",
                         output_format="webdataset", url_col="url", caption_col="caption",
                         processes_count=a.processes, thread_count=4, resize_mode="no",
                         disable_all_reencoding=not reencode, number_sample_per_shard=a.per_shard)
    seconds = time.perf_counter() - start
    return seconds, sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="prep-bench-ingest-"))
    try:
        paths = make_folder(work / "imgs", a.images, a.size)
        table = work / "urls.parquet"
        pq.write_table(pa.table({"url": [p.as_uri() for p in paths],
                                 "caption": [p.with_suffix(".txt").read_text() for p in paths]}), table)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{a.images} images of {a.size}x{a.size} ({mb:.0f} MB), {a.processes} processes, "
              f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}")
        rates: dict[str, list[float]] = {"prep": [], "img2dataset": [], "img2dataset_copy": []}
        ratios: list[float] = []
        for r in range(a.repeats):
            order = ["prep", "img2dataset", "img2dataset_copy"]
            if r % 2:
                order.reverse()
            got: dict[str, float] = {}
            for name in order:
                out = work / f"{name}-{r}"
                if name == "prep":
                    seconds, n = run_prep(work / "imgs", out, a)
                else:
                    seconds, n = run_img2dataset(table, out, a, reencode=name == "img2dataset")
                assert n == a.images, (name, n)
                got[name] = n / seconds
                rates[name].append(got[name])
                shutil.rmtree(out)
            ratios.append(got["prep"] / got["img2dataset"])
        for name, values in rates.items():
            print(f"{name:>17}: {statistics.median(values):8.1f} images/s (runs: "
                  f"{', '.join(f'{v:.1f}' for v in values)})")
        print(f"prep / img2dataset (re-encoding), per pair: median {statistics.median(ratios):.2f} "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")
        record("ingest", "Local images into tars: prep ingest_local vs img2dataset on file:// URLs",
               f"{a.images} images of {a.size}x{a.size} ({mb:.0f} MB), {a.processes} processes, "
               f"{a.repeats} runs each",
               [Measure("ingest a folder", name, "images/s", values, True) for name, values in rates.items()],
               ["img2dataset decodes and re-encodes every image; img2dataset_copy copies the bytes unchecked "
                "(disable_all_reencoding, the floor); prep keeps the bytes after a full decode check"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
