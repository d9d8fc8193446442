"""`bench/REPORT.md`: every benchmark of one `make bench` run in one page.

A benchmark script calls `record(...)` with its measurements (every run's value, not only the median);
`python -m bench` sets `PREP_BENCH_RESULTS` to a folder, runs the scripts, watches how busy the machine
was with other work while each ran, and writes the report: machine, versions, per benchmark its data,
medians and ranges, ratios against the peers measured in the same run, a chart, and its printed output.
A script that records nothing still gets its printed output in the report.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_ENV = "PREP_BENCH_RESULTS"
BUSY_SHARE = 0.15  # other processes using more than this share of the CPUs make the figures suspect
PACKAGES = ["prep", "torch", "numpy", "pillow", "simplejpeg", "webdataset", "megatron-energon", "litdata",
            "mosaicml-streaming", "torchdata", "img2dataset", "diffusers", "transformers", "pyarrow"]


@dataclass
class Measure:
    """One thing timed, every run's value. `who` is the tool (prep or a peer); measures sharing a
    `task` are compared with each other; `higher_is_better` says how the unit reads."""

    task: str
    who: str
    unit: str
    values: list[float]
    higher_is_better: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass
class Result:
    name: str
    title: str
    data: str
    measures: list[Measure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def record(name: str, title: str, data: str, measures: list[Measure],
           notes: list[str] | None = None) -> None:
    """Keep a benchmark's measurements for the report (a no-op when the script runs on its own)."""
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return
    result = Result(name, title, data, measures, notes or [])
    Path(folder, f"{name}.json").write_text(json.dumps(asdict(result), indent=1))


def load_result(path: Path) -> Result:
    doc = json.loads(path.read_text())
    measures = [Measure(**m) for m in doc["measures"]]
    return Result(doc["name"], doc["title"], doc["data"], measures, doc["notes"])


# ------------------------------------------------------------------------------------------- the machine


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        total = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        kb = int(total.split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cpus": str(os.cpu_count()), "memory": mem, "python": platform.python_version()}


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / tick, sum(fields) / tick


class BusyMeter:
    """How much CPU *other* processes used while a benchmark ran: the machine's busy CPU time minus the
    benchmark's own (its children's rusage), as a share of all CPUs over the wall time."""

    def __enter__(self) -> BusyMeter:
        self.load_before = os.getloadavg()[0]
        self.children = os.times()
        self.cpu = _cpu_jiffies()
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.monotonic() - self.start
        busy, _ = _cpu_jiffies()
        t = os.times()
        own = (t.children_user - self.children.children_user
               + t.children_system - self.children.children_system)
        cpus = os.cpu_count() or 1
        self.wall = wall
        self.own_share = own / (wall * cpus) if wall > 0 else 0.0
        self.other_share = max(0.0, (busy - self.cpu[0] - own) / (wall * cpus)) if wall > 0 else 0.0

    def busy(self) -> bool:
        return self.other_share > BUSY_SHARE

    def describe(self) -> str:
        cpus = os.cpu_count() or 1
        text = (f"other processes used {100 * self.other_share:.0f}% of the {cpus} CPUs while it ran "
                f"(load average {self.load_before:.1f} before it started)")
        return f"**the machine was busy**: {text}; its figures are less reliable" if self.busy() else text


# -------------------------------------------------------------------------------------------- the page


def ratios(result: Result) -> list[tuple[str, str, str, float]]:
    """(task, prep, peer, how many times better prep is) for every peer measured on the same task."""
    out = []
    tasks: dict[str, list[Measure]] = {}
    for m in result.measures:
        tasks.setdefault(m.task, []).append(m)
    for task, ms in tasks.items():
        ours = next((m for m in ms if m.who == "prep"), None)
        if ours is None:
            continue
        for peer in ms:
            if peer is ours or ours.median == 0 or peer.median == 0:
                continue
            better = ours.median / peer.median if ours.higher_is_better else peer.median / ours.median
            out.append((task, ours.who, peer.who, better))
    return out


def chart(result: Result, path: Path) -> bool:
    """Medians with min-max ranges per task and tool; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(m.task for m in result.measures))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        ms = [m for m in result.measures if m.task == task]
        med = [m.median for m in ms]
        low = [m.median - min(m.values) for m in ms]
        high = [max(m.values) - m.median for m in ms]
        colors = ["#c44e52" if m.who == "prep" else "#4c72b0" for m in ms]
        ax.bar(range(len(ms)), med, yerr=[low, high], capsize=4, color=colors)
        ax.set_xticks(range(len(ms)), [m.who for m in ms], rotation=20, ha="right", fontsize=8)
        better = " (higher is better)" if ms[0].higher_is_better else " (lower is better)"
        ax.set_ylabel(ms[0].unit + better, fontsize=8)
        ax.set_title(task, fontsize=9)
    fig.suptitle(result.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
    return True


def _fmt(v: float) -> str:
    return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def write_report(out: Path, runs: list[dict[str, Any]], started: str, seconds: float) -> Path:
    """`runs`: per benchmark script, in order: name, exit code, printed output, BusyMeter, Result|None."""
    charts = out.parent / "report"
    charts.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark report", "",
             f"Written by `make bench` (`python -m bench`) on {started}, {seconds / 60:.1f} minutes in all. "
             "Every peer is measured in the same run on the same data as prep; ratios compare medians "
             "(over x means prep is x times better: faster, or higher throughput). Ranges are min–max "
             "over the runs.", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += ["", "## Versions", "", " | ".join(f"{k} {v}" for k, v in versions().items()), ""]
    busy = [r["name"] for r in runs if r["meter"].busy()]
    lines += ["## Summary", "", "| benchmark | status | task | prep vs peer | ratio |",
              "|---|---|---|---|---|"]
    for r in runs:
        status = "ok" if r["rc"] == 0 else f"failed (exit {r['rc']})"
        if r["meter"].busy():
            status += ", machine busy"
        rs = ratios(r["result"]) if r["result"] else []
        if not rs:
            lines.append(f"| {r['name']} | {status} | | (no structured results; see its output) | |")
        for task, ours, peer, better in rs:
            lines.append(f"| {r['name']} | {status} | {task} | {ours} vs {peer} | {better:.2f}x |")
    if busy:
        lines += ["", f"The machine was busy with other work during: {', '.join(busy)} (see each section)."]
    for r in runs:
        res: Result | None = r["result"]
        lines += ["", f"## {r['name']}" + (f": {res.title}" if res else ""), ""]
        lines += [f"- exit code {r['rc']}, {r['meter'].wall:.0f} s", f"- {r['meter'].describe()}"]
        if res:
            lines += [f"- data: {res.data}", "", "| task | tool | median | range | runs | unit |",
                      "|---|---|---|---|---|---|"]
            for m in res.measures:
                lines.append(f"| {m.task} | {m.who} | {_fmt(m.median)} | {_fmt(min(m.values))}–"
                             f"{_fmt(max(m.values))} | {len(m.values)} | {m.unit} |")
            rs = ratios(res)
            if rs:
                lines += [""] + [f"- {task}: {ours} is **{better:.2f}x** better than {peer} (medians)"
                                 for task, ours, peer, better in rs]
            lines += [f"- {n}" for n in res.notes]
            if chart(res, charts / f"{r['name']}.png"):
                lines += ["", f"![{res.title}](report/{r['name']}.png)"]
        tail = r["output"].strip().splitlines()[-40:]
        lines += ["", "<details><summary>printed output</summary>", "", "```", *tail, "```", "", "</details>"]
    out.write_text("\n".join(lines) + "\n")
    return out
