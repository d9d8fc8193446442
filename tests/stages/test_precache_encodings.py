"""precache_encodings on real model classes (tiny, randomly initialised, loaded with from_pretrained)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prep.config import PrepConfig
from prep.encoders.images import cover_box, make_buckets, pick_bucket, prepare_image
from prep.encoders.spec import EncoderConfig
from prep.encoders.storage import load_npy, npy_bytes
from prep.errors import PrepErrorGroup
from prep.formats.index import read_index
from prep.formats.tar import iter_samples
from prep.formats.tar_write import write_shard
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions, legacy_marker_file
from prep.testing.tiny_models import write_tiny_models

STAGE = "precache_encodings"


def _jpg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, n_shards: int = 3, per_shard: int = 5, *, broken: bool = False) -> list[Path]:
    """Shards in a sub-folder (so relative names matter): jpg of varied aspect, txt, json; with
    `broken`, shard 0 gets an undecodable jpg and a sample without txt."""
    rng = np.random.default_rng(7)
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            w, h = [(48, 24), (24, 48), (40, 40), (64, 30), (30, 30)][i % 5]
            members = {
                "jpg": _jpg(rng, w, h),
                "txt": f"a photo of the {['cat', 'dog', 'red'][i % 3]} {s} {i}".encode(),
                "json": json.dumps({"i": i}).encode(),
            }
            if broken and s == 0 and i == 1:
                members["jpg"] = b"not a jpeg"
            if broken and s == 0 and i == 2:
                del members["txt"]
            samples.append((f"{s:03d}{i:05d}", members))
        paths.append(Path(write_shard(folder / "part" / f"{s:05d}.tar", samples).path))
    return paths


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    with open(path, "rb") as f:
        return {s.key: s.data for s in iter_samples(f, str(path), read_data=True)}  # type: ignore[misc]


def config(tmp: Path, models: Path, encoders: list[dict], **stage) -> object:
    section = {
        "input_dir": str(tmp / "in"),
        "output_dir": str(tmp / "out"),
        "batch_size": 2,
        "num_workers": 0,
        "encoders": encoders,
        **stage,
    }
    return PrepConfig.model_validate({STAGE: section})


def vae(models: Path, **kw) -> dict:
    return {
        "key": "vae",
        "modality": "image",
        "model": "diffusers:AutoencoderKL",
        "pretrained": str(models),
        "subfolder": "vae",
        "resolution": 32,
        **kw,
    }


def clip(models: Path, **kw) -> dict:
    return {
        "key": "clip",
        "modality": "text",
        "model": "transformers:CLIPTextModel",
        "pretrained": str(models),
        "subfolder": "text_encoder",
        "max_length": 16,
        **kw,
    }


def t5(models: Path, **kw) -> dict:
    return {
        "key": "t5",
        "modality": "text",
        "model": "transformers:T5EncoderModel",
        "pretrained": str(models),
        "subfolder": "text_encoder_2",
        **kw,
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, models: Path) -> tuple[Path, object, object]:
    """One run with a VAE (moments), CLIP (mask + pooled) and T5 (bf16, stored as bits, trimmed)."""
    tmp = tmp_path_factory.mktemp("encoded")
    make_shards(tmp / "in")
    cfg = config(
        tmp,
        models,
        [
            vae(models),
            clip(models, pooled=True),
            t5(models, padding="longest", dtype="bfloat16", store_dtype="bfloat16"),
        ],
        num_workers=1,
    )
    run = run_stage(STAGE, cfg, RunOptions(quiet=True))
    assert run.ok, run.to_json()["errors"]
    return tmp, cfg, run


@pytest.mark.slow
def test_stored_arrays_equal_direct_model_calls(encoded: tuple, models: Path) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tmp, cfg, run = encoded
    vae_m = AutoencoderKL.from_pretrained(models / "vae").eval()
    clip_m = CLIPTextModel.from_pretrained(models / "text_encoder").eval()
    clip_tok = AutoTokenizer.from_pretrained(models / "tokenizer")
    t5_m = T5EncoderModel.from_pretrained(models / "text_encoder_2").eval()
    t5_tok = AutoTokenizer.from_pretrained(models / "tokenizer_2")
    image_cfg = cfg.precache_encodings.encoders[0]
    checked = 0
    for src in sorted((tmp / "in").rglob("*.tar")):
        rel = src.relative_to(tmp / "in")
        source, out = read_shard(src), read_shard(tmp / "out" / rel)
        assert list(out) == list(source)
        for key, members in source.items():
            got = out[key]
            for ext, data in members.items():  # keep_source: source members byte-identical
                assert got[ext] == data
            x = (
                torch.from_numpy(prepare_image(members["jpg"], image_cfg)).permute(2, 0, 1)[None].float()
                / 127.5
                - 1
            )
            caption = members["txt"].decode()
            with torch.inference_mode():
                moments = vae_m.encode(x).latent_dist.parameters[0].numpy()
                ids = clip_tok(
                    caption, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
                )
                c = clip_m(input_ids=ids["input_ids"])
                t_ids = t5_tok(caption, return_tensors="pt")
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    t = t5_m(**t_ids).last_hidden_state[0].float().numpy()
            np.testing.assert_allclose(load_npy(got["vae.npy"]), moments, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(
                load_npy(got["clip.npy"]), c.last_hidden_state[0].numpy(), rtol=1e-4, atol=1e-4
            )
            np.testing.assert_allclose(
                load_npy(got["clip_pooled.npy"]), c.pooler_output[0].numpy(), rtol=1e-4, atol=1e-4
            )
            assert load_npy(got["clip_mask.npy"]).tolist() == ids["attention_mask"][0].bool().tolist()
            stored_t5 = load_npy(got["t5.npy"], "bfloat16")
            assert stored_t5.shape == t.shape  # trimmed to this caption's own tokens
            np.testing.assert_allclose(stored_t5, t, rtol=3e-2, atol=3e-2)
            checked += 1
        idx = read_index(tmp / "out" / rel)
        assert len(idx) == len(source) + 1
    assert checked == 15
    assert run.counts()["samples_out"] == 15


def test_manifest_records_dtypes_shapes_and_encoders(encoded: tuple) -> None:
    tmp, _, _ = encoded
    doc = json.loads((tmp / "out" / "manifest.json").read_text())
    assert doc["total_samples"] == 15 and [s["path"] for s in doc["shards"]] == [
        f"part/{i:05d}.tar" for i in range(3)
    ]
    assert set(doc["encoders"]) == {"vae", "clip", "t5"}
    assert doc["encoders"]["vae"]["settings"]["latent_mode"] == "moments"
    assert doc["encoders"]["vae"]["scaling_factor"] == 0.5
    assert (
        doc["encoders"]["t5"]["use_attention_mask"] is True
        and doc["encoders"]["clip"]["use_attention_mask"] is False
    )
    fields = doc["fields"]
    assert fields["t5.npy"]["dtype"] == "bfloat16" and fields["t5.npy"]["storage"] == "uint16-bits"
    for shard in sorted((tmp / "out").rglob("*.tar")):
        for members in read_shard(shard).values():
            for ext, meta in fields.items():
                arr = np.load(io.BytesIO(members[ext]), allow_pickle=False)
                assert arr.dtype == (np.uint16 if meta.get("storage") else np.dtype(meta["dtype"]))
                shapes = [tuple(s) for s in meta["shapes"]] if "shapes" in meta else [tuple(meta["shape"])]
                assert arr.shape in shapes
    assert fields["vae.npy"]["shape"] == [8, 16, 16] and fields["clip.npy"]["shape"] == [16, 32]


def test_rerun_skips_every_shard(encoded: tuple) -> None:
    tmp, cfg, _ = encoded
    before = {p: p.read_bytes() for p in (tmp / "out").rglob("*.tar")}
    again = run_stage(STAGE, cfg, RunOptions(quiet=True))
    assert again.ok and {r.status for r in again.results} == {"skipped"}
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in (tmp / "out" / "part").iterdir() if p.name.startswith(".")]  # no spool/temp left
    assert again.nothing_to_do


def test_model_loading_draws_no_progress_bars(tmp_path: Path, models: Path, capfd) -> None:
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    cfg = config(tmp_path, models, [vae(models), clip(models)])
    from prep.stages.precache_encodings import _LOADED

    _LOADED.clear()  # load the models in this test
    assert run_stage(STAGE, cfg, RunOptions(quiet=True)).ok
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err, err


def test_rerun_with_every_shard_done_loads_no_model(tmp_path: Path, models: Path) -> None:
    """The encoder checks import the model classes (seconds): a re-run with nothing to do skips them, so
    even a model folder removed since does not stop it."""
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    local = tmp_path / "models"
    local.symlink_to(models, target_is_directory=True)
    cfg = config(tmp_path, local, [vae(local)])
    assert run_stage(STAGE, cfg, RunOptions(quiet=True)).ok
    local.unlink()
    again = run_stage(STAGE, cfg, RunOptions(quiet=True))
    assert again.ok and again.nothing_to_do
    with pytest.raises(PrepErrorGroup, match="does not exist"):  # with work to do, the checks run
        run_stage(STAGE, cfg, RunOptions(quiet=True, force=True))
    with pytest.raises(PrepErrorGroup, match="does not exist"):  # a dry run checks the whole config
        run_stage(STAGE, cfg, RunOptions(quiet=True, dry_run=True))


def test_an_output_shard_of_an_earlier_larger_plan_is_named(tmp_path: Path, models: Path) -> None:
    """reorganize_tar re-cut into fewer shards: precache's shard of the one gone stays in its folder, and
    generate_wdinfo (or merge) after it would take its samples a second time: the summary names it."""
    make_shards(tmp_path / "in", n_shards=2, per_shard=1)
    cfg = config(tmp_path, models, [vae(models, resolution=16)])
    assert not any("WARNING" in n for n in run_stage(STAGE, cfg, RunOptions(quiet=True)).finalize_notes)
    (tmp_path / "in" / "part" / "00001.tar").unlink()
    again = run_stage(STAGE, cfg, RunOptions(quiet=True))
    assert again.ok and again.planned == 1
    assert any(n.startswith("WARNING: 1 older shard(s)") and "(first: part/00001.tar)" in n
               for n in again.finalize_notes), again.finalize_notes


@pytest.mark.slow
def test_an_in_place_merge_leaves_precache_done(tmp_path: Path, models: Path) -> None:
    """With keep_source: false the chain merges the source members into precache's own shards: a re-run
    of the chain must find both stages done, not re-encode every shard because the files grew."""
    make_shards(tmp_path / "in", n_shards=2, per_shard=2)
    section = {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "num_workers": 0,
               "keep_source": False, "encoders": [vae(models, resolution=16)]}
    cfg = PrepConfig.model_validate({STAGE: section, "merge_source_tar": {"source_extensions": []}})
    assert cfg.merge_source_tar.enable and cfg.merge_source_tar.output_dir is None  # in place
    for stage in (STAGE, "merge_source_tar"):
        assert run_stage(stage, cfg, RunOptions(quiet=True)).ok
    merged = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.tar*"))}
    for stage in (STAGE, "merge_source_tar"):
        again = run_stage(stage, cfg, RunOptions(quiet=True, verify_markers=True))
        assert again.ok and again.nothing_to_do, (stage, [r.status for r in again.results])
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.tar*"))} == merged
    assert "jpg" in read_shard(tmp_path / "out" / "part" / "00000.tar")["00000000"]  # merged, and still so
    (tmp_path / "in" / "part" / "00001.tar").touch()  # a changed source: precache redoes its shard
    assert [r.status for r in run_stage(STAGE, cfg, RunOptions(quiet=True)).results] == ["skipped", "done"]


@pytest.mark.slow
def test_keep_source_false_buckets_sample_mode_and_drops(tmp_path: Path, models: Path) -> None:
    make_shards(tmp_path / "in", n_shards=2, broken=True)
    buckets = [[32, 16], [16, 32], [24, 24]]
    enc = [
        vae(models, resize="buckets", buckets=buckets, latent_mode="sample"),
        clip(models, attention_mask=False),
    ]
    cfg = config(tmp_path, models, enc, keep_source=False, seed=3)
    run = run_stage(STAGE, cfg, RunOptions(quiet=True))
    assert run.ok, run.to_json()["errors"]
    assert run.dropped() == {"undecodable image": 1, "no .txt member": 1}
    assert any("00000001" in n for n in run.to_json()["notes"])
    out0 = read_shard(tmp_path / "out" / "part" / "00000.tar")
    assert sorted(out0) == ["00000000", "00000003", "00000004"]
    assert all(
        sorted(m) == ["clip.npy", "vae.npy"] for m in out0.values()
    )  # encodings only, for merge_source_tar
    assert (tmp_path / "out" / "part" / "00000.tar.idx").exists()
    shapes = {
        k: load_npy(m["vae.npy"]).shape
        for k, m in read_shard(tmp_path / "out" / "part" / "00001.tar").items()
    }
    assert (
        shapes["00100000"] == (4, 8, 16)
        and shapes["00100001"] == (4, 16, 8)
        and shapes["00100002"] == (4, 12, 12)
    )
    field = json.loads((tmp_path / "out" / "manifest.json").read_text())["fields"]["vae.npy"]
    assert field["shape"] == [4, None, None] and [4, 8, 16] in field["shapes"]
    # sample draws are seeded per sample key: another batch size (other batch mates) gives the same latents
    cfg2 = config(
        tmp_path, models, enc, keep_source=False, seed=3, batch_size=3, output_dir=str(tmp_path / "out2")
    )
    assert run_stage(STAGE, cfg2, RunOptions(quiet=True)).ok
    again = read_shard(tmp_path / "out2" / "part" / "00001.tar")
    first = read_shard(tmp_path / "out" / "part" / "00001.tar")
    for k in first:
        np.testing.assert_allclose(
            load_npy(again[k]["vae.npy"]), load_npy(first[k]["vae.npy"]), rtol=1e-5, atol=1e-5
        )
    failing = config(tmp_path, models, enc, on_error="fail", output_dir=str(tmp_path / "out3"))
    res = run_stage(STAGE, failing, RunOptions(quiet=True))
    assert not res.ok and "sample '00000001'" in res.to_json()["errors"][0]


def test_whole_encoder_list_is_validated_before_any_shard_is_read(tmp_path: Path, models: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"garbage that is not a tar" * 40)
    enc = [
        vae(models),
        vae(models, subfolder="no_such_folder"),
        {**clip(models), "model": "diffusers:NoSuchVae", "modality": "image", "max_length": None},
        {"key": "mine", "modality": "text", "model": "no_such_module_xyz:encode"},
        {"key": "oc", "modality": "image", "model": "open_clip", "pretrained": "ViT-B-32:openai"},
    ]
    cfg = config(tmp_path, models, enc)
    with pytest.raises(PrepErrorGroup) as err:
        run_stage(STAGE, cfg, RunOptions(quiet=True))
    lines = [e.line() for e in err.value.errors]
    assert any("'vae' is used 2 times" in line for line in lines)
    assert any("no_such_folder does not exist" in line for line in lines)
    assert any("has no NoSuchVae" in line for line in lines)
    assert any("cannot import no_such_module_xyz" in line for line in lines)
    if importlib.util.find_spec("open_clip") is None:  # the optional extra, named with how to install it
        assert any("open_clip is not installed" in line and "prep[open_clip]" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_hidden_layer_out_of_range_is_one_line_naming_the_encoder(tmp_path: Path, models: Path) -> None:
    """The tiny CLIP and T5 have 2 layers, so 3 hidden states: -3..2 are valid, anything else is named
    with the valid range (not an IndexError from inside the forward)."""
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    for make in (clip, t5):
        for layer, ok in ((3, False), (-4, False), (2, True), (-3, True)):
            enc = make(models, hidden_layer=layer)
            cfg = config(tmp_path, models, [enc], output_dir=str(tmp_path / f"{enc['key']}{layer}"))
            run = run_stage(STAGE, cfg, RunOptions(quiet=True))
            assert run.ok == ok, (enc["key"], layer, run.to_json()["errors"])
            if not ok:
                (line,) = run.to_json()["errors"]
                assert f"encoders[{enc['key']}]: hidden_layer {layer} is out of range" in line, line
                assert "fix: set hidden_layer between -3 and 2" in line, line


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_a_hub_model_not_cached_with_the_hub_out_of_reach_fails_at_once(
    tmp_path: Path, models: Path, monkeypatch, capfd, how: str
) -> None:
    """Each task would spend the hub client's retries (about 25 s) and fail alike, shard after shard; the
    check before any shard names the model once. A model in the hub cache still passes (offline use)."""
    import huggingface_hub.constants

    from prep.encoders.spec import EncoderConfig
    from prep.encoders.validate import validate_encoders
    from prep.testing.servers import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    make_shards(tmp_path / "in", n_shards=3, per_shard=1)
    hub_vae = vae(models, pretrained="org/tiny-sd")
    with pytest.raises(PrepErrorGroup) as err:
        run_stage(STAGE, config(tmp_path, models, [hub_vae]), RunOptions(quiet=True))
    (line,) = [e.line() for e in err.value.errors]
    assert "encoders[0] (key vae): model 'org/tiny-sd' is not in the local hub cache and " in line
    assert ("cannot reach the hub" if how == "unreachable" else "HF_HUB_OFFLINE is set") in line
    assert "Retrying" not in "".join(capfd.readouterr()) and not (tmp_path / "out").exists()
    snapshot = cache / "models--org--tiny-sd" / "snapshots" / ("0" * 40)  # the hub cache's own layout
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").write_bytes((models / "vae" / "config.json").read_bytes())
    (cache / "models--org--tiny-sd" / "refs").mkdir()
    (cache / "models--org--tiny-sd" / "refs" / "main").write_text("0" * 40)
    validate_encoders([EncoderConfig.model_validate(hub_vae)])


def test_static_encoder_config_errors() -> None:
    with pytest.raises(ValueError, match="resolution does not apply to a text encoder"):
        EncoderConfig(
            key="t", modality="text", model="transformers:T5EncoderModel", pretrained="x/y", resolution=64
        )
    with pytest.raises(ValueError, match="needs a CLIP"):
        EncoderConfig(
            key="t", modality="text", model="transformers:T5EncoderModel", pretrained="x/y", pooled=True
        )
    with pytest.raises(ValueError, match="modality: image"):
        EncoderConfig(key="v", modality="text", model="diffusers:AutoencoderKL", pretrained="x/y")
    with pytest.raises(ValueError, match="pattern"):
        EncoderConfig(key="a.b", modality="text", model="m:f")


def test_image_preparation_orientation_alpha_and_crop() -> None:
    cfg = EncoderConfig(
        key="v", modality="image", model="m:f", resize="buckets", buckets=[[32, 16], [16, 32]]
    )
    img = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90°: portrait
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert prepare_image(buf.getvalue(), cfg).shape == (32, 16, 3)  # [H, W, 3] of the portrait bucket
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    square = EncoderConfig(key="v", modality="image", model="m:f", resolution=8)
    assert (prepare_image(buf.getvalue(), square) == 255).all()  # transparency becomes white, not black
    half = np.zeros((40, 80, 3), np.uint8)
    half[:, 40:] = 255  # left half black, right half white: a center crop keeps both halves
    buf = io.BytesIO()
    Image.fromarray(half).save(buf, "PNG")
    out = prepare_image(buf.getvalue(), EncoderConfig(key="v", modality="image", model="m:f", resolution=20))
    assert out.shape == (20, 20, 3) and out[:, :8].max() < 30 and out[:, 12:].min() > 225


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_images_keep_their_tones(fmt: str) -> None:
    """A 16-bit grayscale image is the picture its 8-bit version is (Pillow's own convert clips 16-bit
    values to 255: the VAE would encode an all but white image)."""
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 65536, (24, 40), dtype=np.uint16)
    narrow = np.rint(wide / 257.0).astype(np.uint8)
    cfg = EncoderConfig(key="v", modality="image", model="m:f", resolution=16)
    assert Image.open(io.BytesIO(_saved(wide, fmt))).mode.startswith("I")
    got, want = (prepare_image(_saved(a, fmt), cfg).astype(int) for a in (wide, narrow))
    assert np.abs(got - want).max() <= 1


def _saved(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_bucket_geometry_and_bf16_storage() -> None:
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(0.5 <= w / h <= 2.0 and abs(w * h - 1024**2) / 1024**2 < 0.15 for w, h in buckets)
    assert pick_bucket(2000, 1000, buckets)[0] > pick_bucket(2000, 1000, buckets)[1]
    assert pick_bucket(1000, 1000, buckets) == (1024, 1024)
    size, box = cover_box(100, 50, 32, 32)
    assert size == (64, 32) and box == (16, 0, 48, 32)
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-3]).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(load_npy(npy_bytes(bits), "bfloat16"), values.float().numpy())


def test_group_task_resumes_per_shard(tmp_path: Path, models: Path) -> None:
    make_shards(tmp_path / "in", n_shards=3, per_shard=2)
    enc = [clip(models)]
    assert run_stage(STAGE, config(tmp_path, models, enc), RunOptions(quiet=True)).ok
    target = tmp_path / "out" / "part" / "00002.tar"
    before = target.read_bytes()
    target.unlink()
    grouped = config(tmp_path, models, enc, shards_per_task=3)
    run = run_stage(STAGE, grouped, RunOptions(quiet=True))
    assert run.ok and run.counts()["shards_resumed"] == 2 and run.counts()["shards"] == 3
    assert target.read_bytes() == before
    # task markers lost, shard records kept: every shard comes from its record, no model is loaded,
    # and the manifest still names the encoder that made them
    for marker in (tmp_path / "out" / ".prep" / "done" / STAGE).glob("*.json"):
        marker.unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    records = tmp_path / "out" / ".prep" / "done" / STAGE / "shards"
    assert sorted(r.name for r in records.iterdir()) == [f"part%2F0000{i}.tar.json" for i in range(3)]
    for r in records.iterdir():  # as an older prep named them (`/` as `__`): still reused
        r.rename(legacy_marker_file(records, json.loads(r.read_text())["outcome"]["rel"]))
    again = run_stage(STAGE, grouped, RunOptions(quiet=True))
    assert again.ok and again.counts()["shards_resumed"] == 3 and again.results[0].status == "done"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["encoders"]["clip"]["model"] == "transformers:CLIPTextModel"
    assert manifest["fields"]["clip.npy"]["shape"] == [16, 32] and manifest["total_samples"] == 6


KILLER = """
import os, signal
import torch

def make(marker):
    def encode(captions):
        if os.environ.get("PREP_TEST_KILL") and any("KILL" in c for c in captions):
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 997), marker] for c in captions])
    return encode
"""


@pytest.mark.slow
def test_killed_run_resumes_and_gives_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "killer_enc.py").write_text(KILLER)
    rng = np.random.default_rng(1)
    for s in range(3):
        samples = [
            (f"{s:03d}{i:05d}", {"jpg": _jpg(rng, 16, 16), "txt": (b"KILL" if s == 2 and i == 1 else b"ok")})
            for i in range(3)
        ]
        write_shard(tmp_path / "in" / f"{s:05d}.tar", samples)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        textwrap.dedent(f"""
        precache_encodings:
          input_dir: {tmp_path / "in"}
          output_dir: {tmp_path / "out"}
          num_workers: 0
          encoders:
            - {{key: k, modality: text, model: "killer_enc:make", options: {{marker: 1.5}}}}
    """)
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PREP_TEST_KILL": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "prep.cli", "run", STAGE, "--config", str(cfg_file), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "00000.tar").exists() and (out / "00001.tar").exists() and not (out / "00002.tar").exists()
    first = {p.name: p.read_bytes() for p in out.glob("0000[01].tar")}
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    from prep.config import load_config

    cfg = load_config(cfg_file)
    run = run_stage(STAGE, cfg, RunOptions(quiet=True))
    # shards 0 and 1 were finished before the kill: skipped by their task markers (or, when the runner had
    # not yet written those, reused from the stage's per-shard records), never re-encoded
    assert run.ok and [r.task_id for r in run.results] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(r.status == "skipped" or r.counts["shards_resumed"] == 1 for r in run.results[:2])
    assert run.results[2].status == "done" and run.results[2].counts["shards_resumed"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("0000[01].tar")} == first
    clean = load_config(cfg_file, [f"{STAGE}.output_dir={tmp_path / 'clean'}"])
    assert run_stage(STAGE, clean, RunOptions(quiet=True)).ok
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not list(out.glob(".*.tmp-*"))  # the killed run's spool and temp files are gone
    stored = load_npy(read_shard(out / "00002.tar")["00200001"]["k.npy"])
    assert stored.tolist() == [4.0, float(sum(map(ord, "KILL")) % 997), 1.5]


POOLED_AFTER_TORCH = """
import json, sys
import torch
from prep.config import PrepConfig
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions


def main():
    sections, workers, torch_first = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "torch-first"
    if torch_first:  # torch's intra-op threads (an OpenMP team, MKL) at work in this process before the pool
        torch.set_num_threads(2)
        a = torch.randn(1000, 1000)
        assert float((a @ a).abs().sum()) > 0 and float((a * 2 + 1).sum()) != 0
    for section in sections:
        cfg = PrepConfig.model_validate({"precache_encodings": section})
        run = run_stage("precache_encodings", cfg, RunOptions(workers=workers, quiet=True))
        assert run.ok and [r.status for r in run.results] == ["done"] * 3, run.to_json()


if __name__ == "__main__":
    main()
"""


def run_script(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python script ARGS` in a session of its own: on a hang the whole group, the pool's workers too,
    is killed and the test fails."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} hung: no result in {timeout} s\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes but the .prep/ bookkeeping (its markers hold timings)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prep" not in p.relative_to(folder).parts}


@pytest.mark.slow
def test_pooled_runs_after_torch_ran_in_this_process_finish_with_a_fresh_process_bytes(
    tmp_path: Path, models: Path
) -> None:
    """A notebook's sequence: torch at work in the process (its thread team started), then the stage twice
    with a process pool whose tasks run torch. Forked workers waited forever on the parent's OpenMP team."""
    make_shards(tmp_path / "in", n_shards=3)
    script = tmp_path / "pooled_after_torch.py"
    script.write_text(POOLED_AFTER_TORCH)

    def section(out: str) -> dict:
        return {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / out), "batch_size": 2,
                "num_workers": 0, "device": "cpu", "shards_per_task": 1,
                "encoders": [vae(models), clip(models)]}

    fresh = run_script(script, json.dumps([section("fresh")]), "1", "fresh", timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    twice = run_script(script, json.dumps([section("first"), section("second")]), "2", "torch-first",
                       timeout=300)
    assert twice.returncode == 0, twice.stderr[-3000:]
    reference = outputs(tmp_path / "fresh")
    assert len([name for name in reference if name.endswith(".tar")]) == 3
    assert outputs(tmp_path / "first") == reference and outputs(tmp_path / "second") == reference


def test_rank_slice_only_under_torchrun(monkeypatch) -> None:
    from prep.stages.base import launcher_env, torchrun_slice

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a batch script sees these too: never guessed from them
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert torchrun_slice() == (None, None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_slice() == (3, 4) and launcher_env() == (3, 4, 1)


def test_a_notebook_callable_the_pool_workers_cannot_see_is_named_with_the_way_out(
    tmp_path: Path, models: Path, monkeypatch
) -> None:
    """An encoder defined in a notebook (`__main__:fn`) is found by the planning process but not by
    the pool's workers, which start fresh: each task fails in one line saying to move it into a module
    or run in one process, and in one process it runs."""
    import __main__

    def notebook_encoder(**_):
        return lambda captions: np.array([[len(c), 1.0] for c in captions], np.float32)

    monkeypatch.setattr(__main__, "prep_notebook_encoder", notebook_encoder, raising=False)
    make_shards(tmp_path / "in", n_shards=2, per_shard=2)
    enc = [{"key": "mine", "modality": "text", "model": "__main__:prep_notebook_encoder"}]
    run = run_stage(STAGE, config(tmp_path, models, enc), RunOptions(quiet=True, workers=2))
    errors = run.to_json()["errors"]
    assert not run.ok and len(errors) == 2, errors
    assert all("could not load __main__:prep_notebook_encoder" in e and "--workers 1" in e for e in errors)
    one = run_stage(STAGE, config(tmp_path, models, enc), RunOptions(quiet=True, workers=1))
    assert one.ok and one.counts()["samples_out"] == 4, one.to_json()
