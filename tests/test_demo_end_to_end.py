"""`make shards` end to end: every stage but ingest_local on the offline demo (its one short shard is
information, not a WARNING), then a re-run that skips everything."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prep.formats.manifest import read_manifest
from prep.formats.tar import scan_tar
from prep.formats.wdinfo import read_wdinfo
from prep.testing.servers import free_port

pytestmark = pytest.mark.slow

GOOD, REDIRECTS = 30, 4  # prep.demo adds 4 redirects (served), 4 x 404 and 2 corrupt images (failures)


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file: equal bytes prove determinism, equal mtimes prove nothing was
    rewritten (every task was skipped)."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.suffix in (".tar", ".idx", ".pkl")}


def _demo(out: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prep.demo", "--out", str(out), "--images", str(GOOD),
                           "--port", str(port)], capture_output=True, text=True, timeout=600)


def test_demo_runs_all_six_stages_and_a_rerun_skips_with_identical_bytes(tmp_path):
    out, port = tmp_path / "demo", free_port()
    first = _demo(out, port)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    said = " ".join((first.stdout + first.stderr).split())  # rich wraps the notes
    assert "WARNING" not in said and "the one short last shard reorganize_tar leaves" in said  # by design
    for line in (first.stdout + first.stderr).splitlines():  # 80 columns, beyond what a long path adds
        assert len(line.replace(str(out), "OUT")) <= 80, line
    final = out / "tarfiles_merged"
    manifest = read_manifest(final)
    assert manifest.total_samples == GOOD + REDIRECTS
    wdinfo = read_wdinfo(final / "wdinfo.pkl")
    assert wdinfo["total_key_count"] == GOOD + REDIRECTS and wdinfo["chunk_size"] == 50
    assert json.loads((final / ".nv-meta" / ".info.json").read_text())["shard_counts"] == {
        s.path: s.samples for s in manifest.shards}
    keys = set()
    for shard in manifest.shards:
        for sample in scan_tar(final / shard.path).samples:
            assert {"jpg", "txt", "json", "vae.npy", "clip.npy"} <= set(sample.members), sample.key
            keys.add(sample.key)
    assert len(keys) == GOOD + REDIRECTS
    assert manifest.fields["vae.npy"]["dtype"] == "float32"
    stages_out = ("tarfiles_raw", "tarfiles_reorganized", "tarfiles_precached", "tarfiles_merged")
    before = {name: _digests(out / name) for name in stages_out}
    assert all(before.values())

    report = json.loads((out / "report" / "report.json").read_text())["charts"]  # `make shards` ends with it
    assert {"shards", "downloads", "timings", "captions", "image_sizes", "aspect", "latents"} <= set(report)
    assert all((out / "report" / c["png"]).read_bytes()[:4] == b"\x89PNG" for c in report.values())
    assert report["shards"]["data"]["samples"] == [s.samples for s in manifest.shards]
    from prep.stages.download_images import reasons

    downloads = report["downloads"]["data"]
    for i, part in enumerate(downloads["parts"]):  # the numbers behind the chart are img2dataset's stats
        stats = [json.loads(p.read_text()) for p in (out / "tarfiles_raw" / part).glob("*_stats.json")]
        expected = {"success": sum(st["successes"] for st in stats)}
        for st in stats:
            for reason, n in reasons(st["status_dict"]).items():
                expected[reason] = expected.get(reason, 0) + n
        shown = {r: c[i] for r, c in downloads["reasons"].items() if c[i]}
        assert shown == {r: n for r, n in expected.items() if n}
    assert report["timings"]["data"]["stages"][-1] == "generate_wdinfo"

    second = _demo(out, port)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert {name: _digests(out / name) for name in before} == before
    said = " ".join((second.stdout + second.stderr).split())
    assert said.count("nothing to do") == 6 and "samples/s" not in said  # no work, no rates
