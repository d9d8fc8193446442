"""`make shards`: the whole job, offline, on embedded demo data.

It serves generated images on a loopback HTTP server (a few URLs fail on purpose: 404s, a corrupt
image, redirects), writes a LAION-style parquet table of their URLs and captions, saves tiny randomly
initialised encoders (a real AutoencoderKL and CLIPTextModel), then runs `prep run all` with
`configs/demo.yaml` — every stage but ingest_local — then `prep verify` on the result and `prep report`
on the run folder (`demo_out/report/index.html`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def write_source(out: Path, url_rows: list[tuple[str, str]]) -> Path:
    """Two parquet files (like a hub repo's shards) of (URL, TEXT) rows. A file whose bytes would not
    change is left alone, so a second `make shards` finds every stage done and skips it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prep.formats.atomic import write_bytes_atomic
    from prep.testing.servers import url_table

    src = out / "source"
    src.mkdir(parents=True, exist_ok=True)
    half = len(url_rows) // 2
    for i, part in enumerate((url_rows[:half], url_rows[half:])):
        sink = pa.BufferOutputStream()
        pq.write_table(url_table(part), sink)
        data = sink.getvalue().to_pybytes()
        path = src / f"demo-{i:02d}.parquet"
        if not path.exists() or path.read_bytes() != data:
            write_bytes_atomic(path, data)
    return src


def run(out: Path, good: int, config: Path, port: int) -> int:
    from prep.testing.servers import mixed_rows, serve_images
    from prep.testing.tiny_models import write_tiny_models

    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    if not (models / "vae").exists():
        write_tiny_models(models)
    with serve_images(slow_seconds=0.5, port=port) as srv:  # a fixed port keeps the URLs, so re-runs skip
        write_source(out, mixed_rows(srv, good=good, missing=4, corrupt=2, redirect=4))
        env = {**os.environ, "PREP_DEMO_OUT": str(out.resolve())}
        prep = [sys.executable, "-m", "prep.cli"]
        rc = subprocess.call([*prep, "run", "all", "--config", str(config), "--workers", "2"], env=env)
    if rc != 0:
        return rc
    final = out / "tarfiles_merged"
    rc = subprocess.call([*prep, "verify", str(final)])
    if rc == 0:
        rc = subprocess.call([*prep, "report", str(out)])
    if rc == 0:
        # each path on a line of its own: a long one overflows 80 columns alone, and copies whole
        print(f"\nshards, manifest.json, wdinfo.pkl and .nv-meta/:\n  {final}")
        print(f"the run's charts:\n  {out / 'report' / 'index.html'}")
        print(f"try:\n  prep inspect {final}\n  prep inspect {final / '000000.tar'}")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prep.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    ap.add_argument("--images", type=int, default=240, help="good image URLs to serve (default: 240)")
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG,
                    help="stage config (default: configs/demo.yaml)")
    ap.add_argument("--port", type=int, default=18765,
                    help="loopback port of the image server (default: 18765)")
    args = ap.parse_args(argv)
    return run(args.out, args.images, args.config, args.port)


if __name__ == "__main__":
    sys.exit(main())
