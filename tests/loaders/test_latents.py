"""Latent helpers on real shards with a real manifest: sampling is the posterior's distribution, scaling
uses the manifest's factors, and a sample's noise depends on its key only (batch size, order, resume)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from prep.errors import PrepError
from prep.formats.checksum import file_checksum
from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.formats.tar_write import write_shard
from prep.loaders import (
    DataLoader,
    LatentScaling,
    LatentTransform,
    ShardDataset,
    sample_moments,
    scale_latents,
    split_moments,
    unscale_latents,
)

SCALE, SHIFT = 0.18215, 0.0609


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def moments_of(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    mean = rng.normal(3.0, 2.0, (4, 8, 8)).astype(np.float32)
    logvar = np.full((4, 8, 8), np.log(0.25), np.float32)  # std 0.5
    return np.concatenate([mean, logvar])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    entries = []
    for s in range(2):
        path = tmp_path / f"{s:06d}.tar"
        write_shard(path, [(f"k{s}_{i:03d}", {"vae.npy": npy(moments_of(10 * s + i)), "txt": b"x"})
                           for i in range(6)], fsync=False)
        entries.append(ShardEntry(path.name, 6, path.stat().st_size, file_checksum(path)))
    encoders = {"vae": {"scaling_factor": SCALE, "shift_factor": SHIFT,
                        "settings": {"latent_mode": "moments"}}}
    fields = {"vae.npy": {"dtype": "float32", "shape": [8, 8, 8]}}
    write_manifest(tmp_path, Manifest(entries, fields, encoders))
    return tmp_path


def test_sampling_follows_the_posterior() -> None:
    mean = torch.linspace(-2, 2, 4).reshape(4, 1, 1).expand(4, 64, 64)
    logvar = torch.log(torch.tensor([0.01, 0.25, 1.0, 4.0])).reshape(4, 1, 1).expand(4, 64, 64)
    z = sample_moments(torch.cat([mean, logvar]), torch.Generator().manual_seed(0))
    assert z.shape == (4, 64, 64)
    for c, std in enumerate([0.1, 0.5, 1.0, 2.0]):  # 4096 draws per channel: 5 standard errors
        assert abs(float(z[c].mean() - mean[c, 0, 0])) < 5 * std / 64
        assert abs(float(z[c].std()) - std) < 5 * std / np.sqrt(2 * 4096)
    assert torch.equal(split_moments(torch.cat([mean, logvar]))[0], mean)
    with pytest.raises(PrepError, match="do not stack mean and logvar"):
        split_moments(torch.zeros(3, 4, 4))


def test_scaling_round_trips() -> None:
    s = LatentScaling("vae", "moments", SCALE, SHIFT)
    z = torch.randn(4, 8, 8)
    torch.testing.assert_close(scale_latents(z, s), (z - SHIFT) * SCALE)
    torch.testing.assert_close(unscale_latents(scale_latents(z, s), s), z)


def test_transform_uses_the_manifest_and_depends_on_the_key_only(folder: Path) -> None:
    scaling = LatentScaling.from_manifest(folder)
    assert scaling == LatentScaling("vae", "moments", SCALE, SHIFT)

    def latents(batch_size: int, shuffle: bool, *, sample: bool = True) -> dict[str, torch.Tensor]:
        ds = ShardDataset(folder, batch_size=batch_size, shuffle=shuffle, seed=3, fields=["vae.npy"],
                          transform=LatentTransform(scaling, sample=sample, seed=5))
        out = {}
        for batch in DataLoader(ds, num_workers=0):
            out.update(zip(batch["__key__"], batch["latents"], strict=True))
        return out

    a, b = latents(4, False), latents(3, True)
    assert set(a) == set(b) and len(a) == 12
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # same noise whatever the batching and order
    means = latents(4, False, sample=False)
    for k, z in means.items():
        s, i = int(k[1]), int(k[3:])
        expected = (torch.from_numpy(moments_of(10 * s + i)[:4]) - SHIFT) * SCALE
        torch.testing.assert_close(z, expected)
        assert not torch.equal(a[k], z)  # sampling added noise
    noise = torch.stack([(a[k] - means[k]) / SCALE for k in a])  # eps * std, std = 0.5
    assert abs(float(noise.std()) - 0.5) < 0.05


def test_missing_encoder_is_named(folder: Path) -> None:
    with pytest.raises(PrepError, match=r"no VAE encoder 'sdxl' \(encoders: vae\)"):
        LatentScaling.from_manifest(folder, "sdxl")


def test_bfloat16_stored_as_bits_gives_the_values_precache_computed(tmp_path: Path) -> None:
    """store_dtype: bfloat16 keeps uint16 bit patterns (NumPy has no bfloat16): the transform reads the
    manifest's storage and gives the same latents as a float32 copy of the same bfloat16 outputs."""
    pytest.importorskip("diffusers")
    from PIL import Image

    from prep.config import PrepConfig
    from prep.runtime.runner import run_stage
    from prep.stages.base import RunOptions
    from prep.testing.tiny_models import write_tiny_vae

    vae = write_tiny_vae(tmp_path / "vae", scaling_factor=SCALE)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append((f"k{i}", {"png": buf.getvalue()}))
    write_shard(tmp_path / "in" / "000000.tar", samples, fsync=False)
    got = {}
    for store in ("auto", "bfloat16"):  # auto: bfloat16 compute stored as float32, every value exact
        encoder = {"key": "vae", "modality": "image", "model": "diffusers:AutoencoderKL",
                   "pretrained": str(vae), "resolution": 16, "dtype": "bfloat16", "store_dtype": store}
        cfg = PrepConfig.model_validate({"precache_encodings": {
            "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / store), "num_workers": 0,
            "encoders": [encoder]}})
        assert run_stage("precache_encodings", cfg, RunOptions(quiet=True)).ok
        for sample in (False, True):
            ds = ShardDataset(tmp_path / store, batch_size=5, fields=["vae.npy"],
                              transform=LatentTransform.from_manifest(tmp_path / store, sample=sample))
            batch = next(iter(DataLoader(ds, num_workers=0)))
            got[store, sample] = batch["latents"]
    for sample in (False, True):
        assert got["bfloat16", sample].dtype == torch.float32
        torch.testing.assert_close(got["bfloat16", sample], got["auto", sample], rtol=0, atol=0)
