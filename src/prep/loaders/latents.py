"""Precached VAE latents, ready for a diffusion model: sample the stored moments and scale them.

precache_encodings writes `KEY.npy` per sample. With `latent_mode: moments` (NeMo's choice, the
default) that is the VAE's posterior, unscaled: `[2C, H, W]` float, the mean's C channels then the
log-variance's C channels. A model trains on `z = (mean + exp(logvar / 2) * eps - shift) * scale`, with
the VAE's `scaling_factor` and `shift_factor`, which the stage records in the folder's manifest
(`encoders.KEY.scaling_factor` / `shift_factor`). With `latent_mode: sample` or `mean` the stored
array is already that `z` (`[C, H, W]`, scaled): nothing is left to do.

`LatentTransform` does it in a loader transform (`ShardDataset(..., transform=LatentTransform.
from_manifest(folder))`): each sample's noise comes from (seed, sample key), so a resumed run draws
the same latents it would have drawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prep.errors import PrepError
from prep.formats.manifest import BF16_STORAGE
from prep.loaders.base import stream_key

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


@dataclass(frozen=True)
class LatentScaling:
    """How a precached encoder stored its latents: `mode` (moments, sample or mean) and the VAE's
    `scaling_factor` and `shift_factor`, as the manifest records them."""

    key: str = "vae"
    mode: str = "moments"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    bf16_bits: bool = False  # stored as bfloat16 bit patterns in uint16 (`store_dtype: bfloat16`)

    @classmethod
    def from_manifest(cls, folder: str | os.PathLike[str] | Any, key: str = "vae") -> LatentScaling:
        """Read encoder `key` from a shard folder's manifest.json (or an already read `Manifest`)."""
        from prep.formats.manifest import read_manifest

        manifest = folder if hasattr(folder, "encoders") else read_manifest(folder)
        entry = manifest.encoders.get(key)
        if not entry or "scaling_factor" not in entry:
            known = ", ".join(sorted(manifest.encoders)) or "none"
            raise PrepError(f"the manifest has no VAE encoder {key!r} (encoders: {known})",
                            f"{folder}/manifest.json" if not hasattr(folder, "encoders") else "manifest",
                            "pass the key precache_encodings gave the VAE (its `key:`)")
        mode = str((entry.get("settings") or {}).get("latent_mode", "moments"))
        field = getattr(manifest, "fields", {}).get(f"{key}.npy") or {}
        bits = field.get("storage") == BF16_STORAGE
        return cls(key, mode, float(entry["scaling_factor"]), float(entry.get("shift_factor") or 0.0), bits)

    def stored(self, array: Any) -> torch.Tensor:
        """A stored `KEY.npy` array as a tensor of its values: bfloat16 kept as uint16 bits (NumPy has no
        bfloat16) is viewed as bfloat16 again, instead of being read as integers."""
        t = _tensor(array)
        return t.view(torch.bfloat16) if self.bf16_bits and t.dtype == torch.uint16 else t


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def split_moments(moments: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of stored moments, `[..., 2C, H, W]` -> two `[..., C, H, W]`; logvar clamped as
    diffusers clamps it."""
    m = _tensor(moments)
    if m.ndim < 3 or m.shape[-3] % 2:
        raise PrepError(f"moments of shape {tuple(m.shape)} do not stack mean and logvar on channels",
                        "split_moments", "pass a latent_mode: moments array ([2C, H, W])")
    mean, logvar = m.float().chunk(2, dim=-3)
    return mean, logvar.clamp(*LOGVAR_RANGE)


def sample_moments(moments: Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """An unscaled latent drawn from the stored posterior: mean + exp(logvar / 2) * eps."""
    mean, logvar = split_moments(moments)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def scale_latents(z: Any, scaling: LatentScaling) -> torch.Tensor:
    """What the diffusion model sees: (z - shift_factor) * scaling_factor."""
    return (_tensor(z).float() - scaling.shift_factor) * scaling.scaling_factor


def unscale_latents(z: Any, scaling: LatentScaling) -> torch.Tensor:
    """The inverse, for the VAE's decoder: z / scaling_factor + shift_factor."""
    return _tensor(z).float() / scaling.scaling_factor + scaling.shift_factor


class LatentTransform:
    """A per-sample loader transform: `sample["KEY.npy"]` (moments) becomes `sample[out]`, a scaled
    latent tensor; with `sample=False` the posterior mean is used (no noise). Arrays stored already
    scaled (latent_mode sample/mean) pass through as tensors. Picklable, so it runs in loader workers."""

    def __init__(self, scaling: LatentScaling, *, sample: bool = True, seed: int = 0,
                 out: str = "latents") -> None:
        self.scaling = scaling
        self.sample = sample
        self.seed = int(seed)
        self.out = out

    @classmethod
    def from_manifest(cls, folder: str | os.PathLike[str] | Any, key: str = "vae", **kwargs: Any
                      ) -> LatentTransform:
        return cls(LatentScaling.from_manifest(folder, key), **kwargs)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        field = f"{self.scaling.key}.npy"
        if field not in sample:
            raise PrepError(f"sample has no {field} member (members: {', '.join(sorted(sample))})",
                            str(sample.get("__key__", "sample")), "load the field (fields=[...]) or fix key")
        stored = self.scaling.stored(sample.pop(field))
        if self.scaling.mode != "moments":
            sample[self.out] = _tensor(stored).float()
            return sample
        if self.sample:
            where = f"{self.scaling.key}/{sample.get('__key__', '')}"  # noise per sample, not per batch
            g = torch.Generator().manual_seed(stream_key(self.seed, where, "latent-noise"))
            z = sample_moments(stored, g)
        else:
            z = split_moments(stored)[0]
        sample[self.out] = scale_latents(z, self.scaling)
        return sample

