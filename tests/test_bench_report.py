"""bench/REPORT.md's writer: ratios against peers read the unit the right way round, the page holds
machine, versions, medians and ranges, ratios and a chart, and the busy meter sees other processes'
CPU use (not the benchmark's own)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench._report import BusyMeter, Measure, Result, ratios, write_report


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_ratios_follow_the_unit() -> None:
    res = Result("x", "X", "d", [Measure("t", "prep", "s", [1.0, 2.0, 9.0]), Measure("t", "peer", "s", [4.0]),
                                 Measure("r", "prep", "samples/s", [300.0], True),
                                 Measure("r", "peer", "samples/s", [100.0], True)])
    assert ratios(res) == [("t", "prep", "peer", 2.0), ("r", "prep", "peer", 3.0)]


def test_report_page_holds_every_part(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with BusyMeter() as meter:
        pass
    res = Result("demo", "Demo bench", "10 MB", [Measure("t", "prep", "s", [1.0, 1.5, 2.0]),
                                                  Measure("t", "peer", "s", [3.0, 4.0, 5.0])], ["a note"])
    runs = [{"name": "demo", "rc": 0, "output": "printed line\n", "meter": meter, "result": res},
            {"name": "plain", "rc": 1, "output": "only text\n", "meter": meter, "result": None}]
    page = write_report(tmp_path / "REPORT.md", runs, "today", 60.0).read_text()
    for part in ("## Machine", "cpus: ", "## Versions", "prep ", "torch ", "| t | prep | 1.5 | 1–2 | 3 | s |",
                 "prep vs peer | 2.67x", "printed line", "only text", "failed (exit 1)", "a note",
                 "other processes used"):
        assert part in page, part
    png = tmp_path / "report" / "demo.png"
    assert "](report/demo.png)" in page and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_meter_counts_other_processes_not_the_benchmarks_own() -> None:
    cpus = os.cpu_count() or 1
    others = [mp.get_context("fork").Process(target=_spin, args=(3.0,)) for _ in range(cpus)]
    for p in others:
        p.start()
    try:
        with BusyMeter() as busy:
            time.sleep(1.5)
    finally:
        for p in others:
            p.join()
    assert busy.busy() and busy.other_share > 0.5
    with BusyMeter() as own:  # the benchmark's own children are not "other": 1 CPU second, however loaded
        subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 1.0: pass"],
                       check=True)
    assert own.own_share * cpus * own.wall >= 0.95
    assert own.other_share < busy.other_share
