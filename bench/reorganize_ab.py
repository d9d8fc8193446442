"""reorganize_tar at another git revision against this tree, on the same inputs, in the same run.

Each run is a fresh process (as `prep run` is) that imports prep from one tree; the two trees alternate
run by run, so the machine's slow spells fall on both. The other revision is checked out with
`git worktree` into a temp folder (its C helpers built in place) and removed afterwards. Reports
medians of wall MB/s and CPU s/GB (the process and its pool workers) per configuration, and the ratio
now/before.

    python bench/reorganize_ab.py [--before ce4dbc7] [--size 300] [--rounds 5] [--shuffled]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from reorganize import make_inputs  # noqa: E402

RUN = r"""
import json, os, shutil, sys, time
tree, raw, out, fsync, workers = sys.argv[1:6]
sys.path.insert(0, os.path.join(tree, "src"))
from pathlib import Path
from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions
mb = sum(p.stat().st_size for p in Path(raw).rglob("*.tar")) / 1e6
cfg = load_config(None, [f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                         f"reorganize_tar.fsync={fsync}"])
shutil.rmtree(out, ignore_errors=True)
os.sync()
start, t0 = time.perf_counter(), os.times()
result = run_stage("reorganize_tar", cfg, RunOptions(workers=int(workers), quiet=True))
wall, t1 = time.perf_counter() - start, os.times()
if not result.ok:
    sys.exit(f"reorganize_tar failed: {result.to_json()['errors'][:3]}")
cpu = sum(b - a for a, b in zip(t0[:4], t1[:4]))
print(json.dumps({"mbps": mb / wall, "cpu_s_per_gb": cpu / mb * 1000}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="HEAD", help="git revision to compare with (default HEAD: this "
                    "tree's uncommitted changes, or, when there are none, the noise between equal trees)")
    ap.add_argument("--size", type=int, default=300, help="MB of img2dataset-like input (default 300)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per tree and configuration (medians)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    ap.add_argument("--shuffled", action="store_true", help="samples in download order, not key order")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="prep-bench-ab-"))
    old = work / "before"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before],
                       check=True, capture_output=True)
        if (old / "src/prep/formats/_tarnative.c").exists():  # its C helpers, built as `make install` does
            subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "build_ext",
                            "--inplace"], cwd=old, check=True, capture_output=True)
        _, nbytes = make_inputs(work / "raw", args.size, args.shuffled)
        print(f"data: {nbytes / 1e6:,.0f} MB of img2dataset-like tars; before = {args.before}, now = this "
              f"tree; medians of {args.rounds} alternating runs\n")
        trees = {"before": old, "now": ROOT}
        got: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for fsync in ("true", "false"):
                for w in args.workers:
                    for name, tree in trees.items():
                        out = subprocess.run(
                            [sys.executable, "-c", RUN, str(tree), str(work / "raw"), str(work / "out"),
                             fsync, str(w)], check=True, capture_output=True, text=True).stdout
                        got.setdefault((fsync, w, name), []).append(json.loads(out.strip().splitlines()[-1]))
        print(f"{'fsync':<7}{'workers':>8}{'before MB/s':>13}{'now MB/s':>10}{'ratio':>7}"
              f"{'before CPU s/GB':>17}{'now CPU s/GB':>14}")
        for fsync in ("true", "false"):
            for w in args.workers:
                rate = {n: statistics.median(r["mbps"] for r in got[fsync, w, n]) for n in trees}
                cpu = {n: statistics.median(r["cpu_s_per_gb"] for r in got[fsync, w, n]) for n in trees}
                print(f"{fsync:<7}{w:>8}{rate['before']:>13,.0f}{rate['now']:>10,.0f}"
                      f"{rate['now'] / rate['before']:>7.2f}{cpu['before']:>17.2f}{cpu['now']:>14.2f}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
