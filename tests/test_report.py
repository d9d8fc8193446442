"""`prep report` on real shards and a real stage run: every chart is a valid PNG, and the numbers behind
each equal the manifest's, the summaries' and the members' (the data is checked, not the pixels)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prep.cli import app
from prep.config import load_config
from prep.formats.checksum import file_checksum
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.formats.tar_write import write_shard
from prep.report import BINS
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

pytest.importorskip("matplotlib")

SIZES = [(640, 480), (480, 640), (1024, 1024), (300, 200), (800, 450)]


def caption(s: int, i: int) -> str:
    return "a photo " + "of a cat " * ((s * 7 + i) % 5)


def make_folder(folder: Path, n_shards: int = 3, per: int = 7) -> None:
    for s in range(n_shards):
        samples = []
        for i in range(per - (s == n_shards - 1) * 3):  # a short last shard
            w, h = SIZES[(s + i) % len(SIZES)]
            meta = {"caption": caption(s, i), "original_width": w, "original_height": h, "width": 64,
                    "height": 64}
            members = {"jpg": b"\xff\xd8" + bytes(50 * i), "txt": caption(s, i).encode(),
                       "json": json.dumps(meta).encode()}
            samples.append((f"{s:03d}_{i:04d}", members))
        write_shard(folder / f"{s:06d}.tar", samples, fsync=False)


def valid_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def hist_of(values: list[float]) -> list[int]:
    lo, hi = min(values), max(values)
    bins = BINS if hi > lo else 1
    return np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1))[0].tolist()


def test_report_of_a_shard_folder_matches_manifest_members_and_summary(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    make_folder(shards)
    cfg = load_config(None, [f"generate_wdinfo.input_dir={shards}", "generate_wdinfo.tar_chunk_size=7"])
    assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True)).ok
    result = CliRunner().invoke(app, ["report", str(shards)])
    assert result.exit_code == 0, result.output
    out = shards / "report"
    doc = json.loads((out / "report.json").read_text())
    charts = doc["charts"]
    assert set(charts) == {"shards", "timings", "captions", "image_sizes", "aspect"}
    page = (out / "index.html").read_text()
    for name, chart in charts.items():
        w, h = valid_png(out / chart["png"])
        assert w > 400 and h > 200
        assert f'src="{name}.png"' in page
    m = read_manifest(shards)
    assert charts["shards"]["data"] == {"shards": [s.path for s in m.shards],
                                        "samples": [s.samples for s in m.shards],
                                        "bytes": [s.bytes for s in m.shards]}
    lengths = [len(caption(s, i)) for s in range(3) for i in range(7 - (s == 2) * 3)]
    sizes = [SIZES[(s + i) % len(SIZES)] for s in range(3) for i in range(7 - (s == 2) * 3)]
    cap = charts["captions"]["data"]
    assert cap["n"] == m.total_samples == len(lengths) and cap["counts"] == hist_of(lengths)
    assert cap["mean"] == pytest.approx(np.mean(lengths))
    img = charts["image_sizes"]["data"]
    assert img["width"]["counts"] == hist_of([w for w, _ in sizes])  # the originals, not the 64 px
    assert img["height"]["counts"] == hist_of([h for _, h in sizes])
    assert charts["aspect"]["data"]["counts"] == hist_of([w / h for w, h in sizes])
    summary = json.loads((shards / ".prep/summary/generate_wdinfo.json").read_text())
    t = charts["timings"]["data"]
    assert t["stages"] == ["generate_wdinfo"]
    assert t["samples"] == [summary["counts"]["samples"]] == [m.total_samples]
    assert t["seconds"] == [summary["seconds"]]


def test_latent_statistics_are_the_scaled_posterior_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scale, shift = 0.13, 0.4
    means = []
    entries = []
    for s in range(2):
        samples = []
        for i in range(5):
            mean = rng.normal([[[1.0]], [[-2.0]], [[0.5]]], [[[1.0]], [[3.0]], [[0.1]]], (3, 4, 4))
            moments = np.concatenate([mean, np.zeros_like(mean)]).astype(np.float32)
            means.append(moments[:3])
            buf = io.BytesIO()
            np.save(buf, moments)
            samples.append((f"{s}_{i}", {"vae.npy": buf.getvalue()}))
        path = tmp_path / f"{s:06d}.tar"
        write_shard(path, samples, fsync=False)
        entries.append(ShardEntry(path.name, 5, path.stat().st_size, file_checksum(path)))
    encoders = {"vae": {"scaling_factor": scale, "shift_factor": shift,
                        "settings": {"latent_mode": "moments"}}}
    fields = {"vae.npy": {"dtype": "float32", "shape": [6, 4, 4]}}
    write_manifest(tmp_path, Manifest(entries, fields, encoders))
    assert CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")]).exit_code == 0
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    lat = doc["charts"]["latents"]["data"]
    scaled = (np.stack(means).astype(np.float64) - shift) * scale  # [samples, C, H, W]
    np.testing.assert_allclose(lat["mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(lat["std"], scaled.std(axis=(0, 2, 3)), rtol=1e-4)
    assert lat["samples"] == 10 and (lat["scaling_factor"], lat["shift_factor"]) == (scale, shift)
    valid_png(tmp_path / "r" / "latents.png")


@pytest.mark.parametrize(("mode", "store"), [("moments", "bfloat16"), ("mean", "float32"),
                                           ("sample", "bfloat16")])
def test_latent_statistics_of_a_precache_run_in_every_mode_and_storage(tmp_path: Path, mode: str,
                                                                        store: str) -> None:
    """The chart shows the latents a model trains on, whatever precache stored: `sample`/`mean` arrays
    are stored scaled (so not scaled again), and bfloat16 kept as uint16 bits is widened first."""
    pytest.importorskip("diffusers")
    from prep.config import PrepConfig
    from prep.encoders.storage import load_npy
    from prep.formats.tar import iter_samples
    from prep.testing.tiny_models import write_tiny_vae

    scale = 0.25
    vae = write_tiny_vae(tmp_path / "vae", scaling_factor=scale)
    rng = np.random.default_rng(0)
    for s in range(2):
        samples = []
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 20 + 4 * i, 3), dtype=np.uint8)).save(buf, "JPEG")
            samples.append((f"{s}_{i}", {"jpg": buf.getvalue()}))
        write_shard(tmp_path / "in" / f"{s:06d}.tar", samples, fsync=False)
    dtype = "bfloat16" if store == "bfloat16" else "float32"
    encoder = {"key": "vae", "modality": "image", "model": "diffusers:AutoencoderKL", "pretrained": str(vae),
               "resolution": 16, "latent_mode": mode, "dtype": dtype, "store_dtype": store}
    cfg = PrepConfig.model_validate({"precache_encodings": {
        "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "num_workers": 0,
        "encoders": [encoder]}})
    assert run_stage("precache_encodings", cfg, RunOptions(quiet=True)).ok
    out = tmp_path / "out"
    stored_as = read_manifest(out).fields["vae.npy"]["dtype"]
    latents = []
    for tar in sorted(out.glob("*.tar")):
        with open(tar, "rb") as f:
            for sample in iter_samples(f, str(tar), read_data=True):
                z = load_npy(sample.data["vae.npy"], stored_as).astype(np.float64)  # type: ignore[union-attr]
                latents.append(z[: len(z) // 2] * scale if mode == "moments" else z)  # shift_factor 0
    want = np.stack(latents)
    assert CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "r")]).exit_code == 0
    lat = json.loads((tmp_path / "r" / "report.json").read_text())["charts"]["latents"]["data"]
    assert lat["mode"] == mode and lat["samples"] == 6
    np.testing.assert_allclose(lat["mean"], want.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(lat["std"], want.std(axis=(0, 2, 3)), rtol=1e-4, atol=1e-7)


def test_an_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to report" in result.output and "fix:" in result.output
