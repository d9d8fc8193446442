"""`prep report DIR`: one HTML page and its PNG charts for a run folder or a shard folder.

What it shows, and where each number comes from (no image is decoded):
- samples and bytes per shard: the final shard folder's manifest.json (a header walk without one);
- download outcomes by reason per part: download_images' done-markers (img2dataset's stats);
- caption lengths, image sizes and aspect ratios: each sample's json member (img2dataset's and
  ingest_local's `original_width`/`original_height`, else `width`/`height`; the caption from txt);
- stage timings and throughput: the summaries each `prep run` keeps in `.prep/summary/`;
- latent per-channel mean and std, when precached: the VAE's `KEY.npy` members, moments scaled with the
  manifest's factors, `sample`/`mean` latents as stored (already scaled); a wrong scaling factor shows
  as a std far from 1.

Every chart's numbers are written next to it in `report.json`, so what a chart says can be checked.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prep.errors import PrepError
from prep.formats.manifest import MANIFEST_NAME, Manifest, read_manifest
from prep.formats.tar import read_member, scan_tar, shard_files

REPORT_DIR = "report"
LATENT_SAMPLES = 256  # samples whose latents the statistics use (spread over the shards)
MEMBER_SAMPLES = 100_000  # json members read for the histograms; a bigger folder is sampled evenly
BINS = 30


@dataclass
class Chart:
    """One PNG and the numbers behind it."""

    name: str
    title: str
    data: dict[str, Any]
    note: str = ""


@dataclass
class Report:
    root: Path
    shard_folder: Path | None
    charts: list[Chart] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ finding


def final_shard_folder(root: Path) -> Path | None:
    """The folder whose shards the run ends with: `root` when it holds a manifest or shards, else the
    sub-folder whose manifest has the longest history (the most stages behind it)."""
    if (root / MANIFEST_NAME).exists():
        return root
    best: tuple[int, float, Path] | None = None
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / MANIFEST_NAME).exists():
            try:
                rank = (len(read_manifest(sub).history), (sub / MANIFEST_NAME).stat().st_mtime, sub)
            except PrepError:
                continue
            if best is None or rank[:2] > best[:2]:
                best = rank
    if best is not None:
        return best[2]
    return root if shard_files(root, recursive=False) else None


def _near(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` in `root` or one folder below it (a run folder's stage outputs)."""
    return sorted({*root.glob(pattern), *root.glob(f"*/{pattern}")})


# --------------------------------------------------------------------------------------------- data


def shard_chart(folder: Path) -> Chart:
    try:
        m: Manifest | None = read_manifest(folder)
    except PrepError:
        m = None
    if m is not None:
        names = [s.path for s in m.shards]
        samples = [s.samples for s in m.shards]
        sizes = [s.bytes for s in m.shards]
        note = "from manifest.json"
    else:
        tars = shard_files(folder)
        names = [t.relative_to(folder).as_posix() for t in tars]
        samples = [len(scan_tar(t, tolerate_damage=True).samples) for t in tars]
        sizes = [t.stat().st_size for t in tars]
        note = "from a header walk of each shard (no manifest.json)"
    return Chart("shards", "Samples and bytes per shard",
                 {"shards": names, "samples": samples, "bytes": sizes}, note)


def download_chart(root: Path) -> Chart | None:
    """Per part: images kept and each failure reason, from download_images' done-markers."""
    parts: list[str] = []
    rows: list[dict[str, int]] = []
    for marker in _near(root, ".prep/done/download_images/*.json"):
        try:
            result = json.loads(marker.read_text("utf-8"))["result"]
        except (OSError, ValueError, KeyError):
            continue
        parts.append(result["task_id"])
        rows.append({"success": int(result["counts"].get("samples_out", 0)), **result.get("dropped", {})})
    if not parts:
        return None
    reasons = sorted({r for row in rows for r in row}, key=lambda r: (r != "success", r))
    data = {"parts": parts, "reasons": {r: [row.get(r, 0) for row in rows] for r in reasons}}
    return Chart("downloads", "Download outcomes by reason, per part", data,
                 "from download_images' done-markers (img2dataset's stats per shard)")


def _even_pick(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64)) if n else np.zeros(0, int)


def _samples(folder: Path, limit: int) -> Iterator[tuple[Path, Any]]:
    """(shard, sample) for up to `limit` samples spread evenly over the folder's shards."""
    tars = shard_files(folder)
    scans = [(t, scan_tar(t, tolerate_damage=True).samples) for t in tars]
    total = sum(len(s) for _, s in scans)
    pick = set(_even_pick(total, limit).tolist())
    i = 0
    for tar, samples in scans:
        for s in samples:
            if i in pick:
                yield tar, s
            i += 1


def member_charts(folder: Path, limit: int = MEMBER_SAMPLES) -> list[Chart]:
    """Caption length, image size and aspect ratio histograms, from txt and json members only."""
    captions: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    handles: dict[Path, Any] = {}
    try:
        for tar, s in _samples(folder, limit):
            f = handles.get(tar) or handles.setdefault(tar, open(tar, "rb"))  # noqa: SIM115 (closed below)
            meta: dict[str, Any] = {}
            if "json" in s.members:
                try:
                    meta = json.loads(read_member(f, s.members["json"]))
                except ValueError:
                    meta = {}
            if "txt" in s.members:
                captions.append(len(read_member(f, s.members["txt"]).decode("utf-8", "replace")))
            elif isinstance(meta.get("caption"), str):
                captions.append(len(meta["caption"]))
            w = meta.get("original_width") or meta.get("width")
            h = meta.get("original_height") or meta.get("height")
            if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
                widths.append(w)
                heights.append(h)
    finally:
        for f in handles.values():
            f.close()
    charts = []
    if captions:
        charts.append(Chart("captions", "Caption length (characters)", histogram(captions),
                            "from the txt members (json caption when there is no txt)"))
    if widths:
        sizes = {"width": histogram(widths), "height": histogram(heights)}
        charts.append(Chart("image_sizes", "Image width and height (pixels, as downloaded)", sizes,
                            "from the json members' original_width/original_height, no image decoded"))
        aspect = [w / h for w, h in zip(widths, heights, strict=True)]
        charts.append(Chart("aspect", "Aspect ratio (width / height)", histogram(aspect),
                            "from the json members"))
    return charts


def histogram(values: list[float] | list[int]) -> dict[str, Any]:
    """Counts over BINS equal bins from min to max (one bin when all are equal), plus n/mean/median."""
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    counts, edges = np.histogram(arr, bins=BINS if hi > lo else 1, range=(lo, hi if hi > lo else lo + 1))
    return {"n": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def timing_chart(root: Path) -> Chart | None:
    """Seconds and samples/s per stage, from the summary each `prep run` keeps (the latest run that did
    work; slices of a Slurm array each keep their own, added up here)."""
    from prep.stages import STAGE_ORDER

    per: dict[str, dict[str, float]] = {}
    for path in _near(root, ".prep/summary/*.json"):
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        stage = doc.get("stage")
        if stage not in STAGE_ORDER:
            continue
        counts = doc.get("counts", {})
        samples = doc.get("samples_done", counts.get("samples_out", counts.get("samples", 0)))
        entry = per.setdefault(stage, {"seconds": 0.0, "samples": 0})
        entry["seconds"] += float(doc.get("seconds", 0.0))
        entry["samples"] += int(samples)
    if not per:
        return None
    stages = [s for s in STAGE_ORDER if s in per]
    seconds = [round(per[s]["seconds"], 3) for s in stages]
    samples = [int(per[s]["samples"]) for s in stages]
    rates = [round(n / t, 1) if t > 0 else 0.0 for n, t in zip(samples, seconds, strict=True)]
    return Chart("timings", "Stage time and throughput", {"stages": stages, "seconds": seconds,
                 "samples": samples, "samples_per_second": rates},
                 "from each stage's .prep/summary (its latest run that did work)")


def latent_chart(folder: Path, limit: int = LATENT_SAMPLES) -> Chart | None:
    """Per-channel mean and std of the scaled latents of each VAE the manifest records: moments are
    scaled here; `sample`/`mean` latents were stored scaled, so they are taken as they are (scaling them
    again would show std times the factor). bfloat16 kept as uint16 bits is widened first."""
    from prep.encoders.storage import load_npy
    from prep.loaders.latents import LatentScaling, scale_latents, split_moments

    try:
        m = read_manifest(folder)
    except PrepError:
        return None
    vaes = [k for k, e in sorted(m.encoders.items()) if "scaling_factor" in e and f"{k}.npy" in m.fields]
    if not vaes:
        return None
    key = vaes[0]
    scaling = LatentScaling.from_manifest(m, key)
    dtype = m.fields[f"{key}.npy"].get("dtype")
    sums: np.ndarray | None = None
    squares: np.ndarray | None = None
    n = 0
    seen = 0
    handles: dict[Path, Any] = {}
    try:
        for tar, s in _samples(folder, limit):
            member = s.members.get(f"{key}.npy")
            if member is None:
                continue
            f = handles.get(tar) or handles.setdefault(tar, open(tar, "rb"))  # noqa: SIM115 (closed below)
            arr = load_npy(read_member(f, member), dtype)
            if scaling.mode == "moments":
                z = split_moments(arr)[0]  # the posterior mean
                scaled = scale_latents(z, scaling).double().numpy().reshape(z.shape[0], -1)
            else:
                scaled = arr.astype(np.float64).reshape(arr.shape[0], -1)
            sums = scaled.sum(1) if sums is None else sums + scaled.sum(1)
            squares = (scaled**2).sum(1) if squares is None else squares + (scaled**2).sum(1)
            n += scaled.shape[1]
            seen += 1
    finally:
        for f in handles.values():
            f.close()
    if sums is None or squares is None:
        return None
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    data = {"key": key, "mode": scaling.mode, "scaling_factor": scaling.scaling_factor,
            "shift_factor": scaling.shift_factor, "samples": seen,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    what = "posterior means" if scaling.mode != "sample" else "stored latent draws"
    return Chart("latents", f"Latent statistics per channel ({key}, scaled)", data,
                 f"{what} of {seen} samples, (z - {scaling.shift_factor}) * "
                 f"{scaling.scaling_factor}: a well-scaled latent has std near 1")


def collect(root: Path) -> Report:
    """Every chart the folder has data for."""
    root = Path(root)
    if not root.is_dir():
        raise PrepError("not a folder" if root.exists() else "folder does not exist", str(root),
                        "point prep report at a run folder (dataset_output_root) or a shard folder")
    folder = final_shard_folder(root)
    rep = Report(root, folder)
    if folder is not None:
        rep.charts.append(shard_chart(folder))
        rep.facts.append(("shard folder", str(folder)))
    for chart in (download_chart(root), timing_chart(root)):
        if chart is not None:
            rep.charts.append(chart)
    if folder is not None:
        rep.charts += member_charts(folder)
        latents = latent_chart(folder)
        if latents is not None:
            rep.charts.append(latents)
    if not rep.charts:
        raise PrepError("nothing to report: no shards, summaries or download markers found", str(root),
                        "point prep report at a run folder (dataset_output_root) or a shard folder")
    shards = next((c for c in rep.charts if c.name == "shards"), None)
    if shards is not None:
        rep.facts += [("shards", f"{len(shards.data['shards']):,}"),
                      ("samples", f"{sum(shards.data['samples']):,}"),
                      ("bytes", f"{sum(shards.data['bytes']):,}")]
    return rep


# ------------------------------------------------------------------------------------------ drawing


def _bars(ax: Any, labels: list[str], values: list[float], color: str) -> None:
    ax.bar(range(len(values)), values, color=color)
    step = max(1, math.ceil(len(labels) / 20))
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=60, ha="right", fontsize=7)


def _hist(ax: Any, h: dict[str, Any], color: str, label: str | None = None) -> None:
    edges = np.asarray(h["edges"])
    ax.stairs(h["counts"], edges, fill=True, alpha=0.6, color=color, label=label)
    ax.set_ylabel("samples")


def draw(chart: Chart) -> bytes:
    """One PNG (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = chart.data
    fig, axes = plt.subplots(1, 2 if chart.name in ("shards", "timings", "latents") else 1,
                             figsize=(11, 4), squeeze=False)
    a = axes[0]
    if chart.name == "shards":
        _bars(a[0], d["shards"], d["samples"], "#4c72b0")
        a[0].set_ylabel("samples")
        _bars(a[1], d["shards"], [b / 2**20 for b in d["bytes"]], "#55a868")
        a[1].set_ylabel("MiB")
    elif chart.name == "downloads":
        bottom = np.zeros(len(d["parts"]))
        for reason, counts in d["reasons"].items():
            a[0].bar(range(len(counts)), counts, bottom=bottom, label=reason)
            bottom += np.asarray(counts)
        a[0].set_xticks(range(len(d["parts"])), d["parts"], rotation=60, ha="right", fontsize=7)
        a[0].set_ylabel("rows")
        a[0].legend(fontsize=7)
    elif chart.name == "timings":
        _bars(a[0], d["stages"], d["seconds"], "#8172b2")
        a[0].set_ylabel("seconds")
        _bars(a[1], d["stages"], d["samples_per_second"], "#c44e52")
        a[1].set_ylabel("samples/s")
    elif chart.name == "image_sizes":
        _hist(a[0], d["width"], "#4c72b0", "width")
        _hist(a[0], d["height"], "#dd8452", "height")
        a[0].set_xlabel("pixels")
        a[0].legend()
    elif chart.name == "latents":
        x = range(len(d["mean"]))
        a[0].bar(x, d["mean"], color="#4c72b0")
        a[0].axhline(0, color="k", lw=0.5)
        a[0].set_title("mean", fontsize=9)
        a[1].bar(x, d["std"], color="#55a868")
        a[1].axhline(1, color="k", lw=0.5, ls="--")
        a[1].set_title("std (1 is well scaled)", fontsize=9)
        for ax in a:
            ax.set_xlabel("channel")
            ax.set_xticks(list(x))
    else:  # a histogram: captions, aspect
        _hist(a[0], d, "#4c72b0")
    fig.suptitle(chart.title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(root: Path, out: Path | None = None) -> Path:
    """Collect, draw every chart into `out` (default `ROOT/report`), write report.json and index.html;
    returns the HTML path. Files are written whole (temp + rename)."""
    from prep.formats.atomic import write_bytes_atomic, write_text_atomic

    rep = collect(root)
    out = Path(out) if out is not None else Path(root) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for chart in rep.charts:
        write_bytes_atomic(out / f"{chart.name}.png", draw(chart))
    doc = {"root": str(rep.root), "shard_folder": str(rep.shard_folder) if rep.shard_folder else None,
           "charts": {c.name: {"title": c.title, "png": f"{c.name}.png", "note": c.note, "data": c.data}
                      for c in rep.charts}}
    write_text_atomic(out / "report.json", json.dumps(doc, indent=1))
    write_text_atomic(out / "index.html", render_html(rep))
    return out / "index.html"


def render_html(rep: Report) -> str:
    e = html.escape
    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rep.facts)
    parts = [f"<section><h2>{e(c.title)}</h2><p>{e(c.note)}</p>"
             f"<img src=\"{e(c.name)}.png\" alt=\"{e(c.title)}\"></section>" for c in rep.charts]
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>prep report: "
            f"{e(str(rep.root))}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
            "img{max-width:100%}th{text-align:left;padding-right:1em}</style></head><body>"
            f"<h1>prep report</h1><p>{e(str(rep.root))}</p><table>{facts}</table>"
            + "".join(parts) + "<p>The numbers behind every chart are in report.json.</p></body></html>\n")
