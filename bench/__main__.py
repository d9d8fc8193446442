"""`make bench`: run every benchmark script in bench/, one after another, and write bench/REPORT.md.

    python -m bench                      # every benchmark
    python -m bench generate_wdinfo      # only these (the report then holds only them)

Each script's output is shown as it runs and kept for the report; scripts that call
`bench._report.record` add their measurements (medians, ranges, ratios, a chart). While each runs, the
CPU time other processes use is measured, and the report says when the machine was busy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import RESULTS_ENV, BusyMeter, load_result, write_report

HERE = Path(__file__).parent


def run_script(script: Path, results: Path) -> tuple[int, str]:
    """Run one benchmark, echoing its output line by line, and return (exit code, output)."""
    import os

    env = {**os.environ, RESULTS_ENV: str(results)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE.parent)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (file names without .py); all when none")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md",
                    help="the report (default bench/REPORT.md)")
    args = ap.parse_args(argv)
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))
    unknown = set(args.names) - {p.stem for p in scripts}
    if unknown:
        known = ", ".join(p.stem for p in scripts)
        ap.error(f"no benchmark {', '.join(sorted(unknown))} (there are: {known})")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="prep-bench-results-") as tmp:
        results = Path(tmp)
        for script in scripts:
            if args.names and script.stem not in args.names:
                continue
            print(f"\n=== bench/{script.name} ===", flush=True)
            with BusyMeter() as meter:
                rc, output = run_script(script, results)
            found = results / f"{script.stem}.json"
            runs.append({"name": script.stem, "rc": rc, "output": output, "meter": meter,
                         "result": load_result(found) if found.exists() else None})
    report = write_report(args.out, runs, started, time.monotonic() - t0)
    failed = [r["name"] for r in runs if r["rc"] != 0]
    print(f"\nwrote {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
