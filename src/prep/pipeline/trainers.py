"""Reference trainers for `prep pipeline run` without `--entry`: `vae` (AutoencoderKL reconstruction +
KL, optional patch-GAN) and `flow` (rectified flow of a diffusers denoiser on VAE latents, conditioned
on text embeddings).

They follow the orchestrator's trainer protocol (`train_step(batch, ctx)`, `val_step`, `metrics`,
`state_dict`, plus `sample(ctx)`, the picture hook) and draw every random number from torch's global
generator, which checkpoints restore, so a resumed run trains bitwise as an uninterrupted one. The
flow trainer reads what precache_encodings wrote (`KEY.vae.npy` moments, sampled with the manifest's
scaling/shift factor; `KEY.clip.npy` + mask) and otherwise encodes on the fly with prep.encoders'
own VAE and text-encoder code around the frozen modules, so both roads give the same latents.

FluxFlow's flags: `train_vae` -> vae, `train_diff` / `train_diff_full` -> flow (full: give the text
encoder an optimizer and it trains, encoding captions on the fly), `gan_training` -> the vae trainer's
discriminator, `train_spade` -> the vae trainer calls `decode(z, use_spade=True)` (for VAEs whose
decoder has SPADE layers; AutoencoderKL has none and is refused).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, ValidationError

from prep.errors import PrepError, PrepErrorGroup
from prep.models import ConfigModel
from prep.pipeline.config import PipelineConfig, PrepDatasetConfig

REFERENCE_TRAINERS = ("vae", "flow")


# ------------------------------------------------------------------------------------------ options
class _Options(ConfigModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VAEOptions(_Options):
    module: str = Field("vae", description="the AutoencoderKL module")
    image_key: str = Field("jpg", description="the image field (decode: float or uint8)")
    loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = Field(1e-6, ge=0)
    discriminator: str = Field("discriminator", description="module trained when the step sets gan_training")
    gan_weight: float = Field(0.1, ge=0)
    sample_images: int = Field(4, gt=0, description="images in the sample grid (originals over outputs)")


class FlowOptions(_Options):
    denoiser: str = Field("flow_processor", description="the denoiser module (UNet2DConditionModel-like)")
    vae: str = Field("vae", description="the frozen VAE: encodes raw images, decodes samples")
    text_encoder: str | None = Field("text_encoder", description="encodes captions not precached")
    latent_key: str = Field("vae", description="precached KEY.<latent_key>.npy")
    text_key: str = Field("clip", description="precached KEY.<text_key>.npy (+ _mask.npy)")
    image_key: str = "jpg"
    caption_key: str = "txt"
    resolution: int = Field(64, ge=8, description="raw images encoded on the fly: cover + center crop")
    max_length: int | None = Field(
        None, gt=0, description="tokens per caption encoded on the fly (default: what the precached "
        "text embeddings used, so both give the denoiser the same kind of embedding; else 32)")
    scaling_factor: float | None = Field(None, description="default: the manifest's, else the VAE's")
    shift_factor: float | None = None
    cfg_dropout: float = Field(0.1, ge=0, le=1, description="share of captions dropped (CFG)")
    timestep_scale: float = Field(1000.0, gt=0, description="t in [0, 1] is passed as t * this")
    sample_images: int = Field(4, gt=0)
    sample_steps: int = Field(4, gt=0, description="Euler steps of a sample")
    guidance: float = Field(2.0, ge=1.0, description="classifier-free guidance scale of samples")


def options(cfg: PipelineConfig, name: str) -> Any:
    kind = VAEOptions if name == "vae" else FlowOptions
    try:
        return kind.model_validate(cfg.trainer_options.get(name, {}))
    except ValidationError as err:
        raise PrepErrorGroup(
            [
                PrepError(
                    f"{cfg.dotted(('trainer_options', name, *map(str, e['loc'])))}: {e['msg']}",
                    cfg.place(("trainer_options", name, *map(str, e["loc"]))),
                    f"see {kind.__name__} in docs/pipeline.md",
                )
                for e in err.errors()
            ]
        ) from None


# ---------------------------------------------------------------------------------------- helpers
def _pixels(value: Any) -> torch.Tensor:
    """A batch of images (B x 3 x H x W, float in [0, 1] or uint8) as float in [-1, 1]."""
    if not isinstance(value, torch.Tensor):
        raise PrepError(
            f"images arrive as {type(value).__name__}, not a tensor",
            "trainer_options",
            "set the dataset's decode: float (or uint8) and image_size",
        )
    x = value.float() / 255.0 if value.dtype == torch.uint8 else value.float()
    return x * 2.0 - 1.0


def _field(batch: Mapping[str, Any], key: str, trainer: str) -> Any:
    if key not in batch:
        have = ", ".join(sorted(k for k in batch if not k.startswith("__")))
        raise PrepError(
            f"{trainer} trainer: the batch has no {key!r} field (it has {have})",
            f"trainer_options.{trainer}",
            "set the trainer's *_key options, or the dataset's fields",
        )
    return batch[key]


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> one H*rows x W*columns x 3 uint8 picture (rows filled in order)."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * h, columns * w)
    for i, img in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _recon_loss(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a, b) if kind == "l1" else F.mse_loss(a, b)


# --------------------------------------------------------------------------------------------- vae
class PatchDiscriminator(torch.nn.Module):
    """A pix2pix-style patch discriminator: one logit per patch (`models:` can name it as
    `prep.pipeline.trainers:PatchDiscriminator` with `options: {channels: 32, layers: 3}`)."""

    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        mods: list[torch.nn.Module] = []
        c_in, c = in_channels, channels
        for i in range(layers):
            mods += [torch.nn.Conv2d(c_in, c, 4, 2 if i < layers - 1 else 1, 1), torch.nn.LeakyReLU(0.2)]
            c_in, c = c, c * 2
        mods.append(torch.nn.Conv2d(c_in, 1, 3, 1, 1))
        self.net = torch.nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class VAETrainer:
    """AutoencoderKL: L1/L2 reconstruction + `kl_weight` x KL (of a posterior sample); with the step's
    `gan_training`, a hinge patch-GAN whose discriminator steps its own optimizer (`discriminator`).
    Works at whatever resolution the step's dataset gives."""

    metrics = ("vae_loss", "rec_loss", "kl_loss", "g_loss", "d_loss")

    def __init__(self, opts: VAEOptions) -> None:
        self.o = opts
        self._fixed: torch.Tensor | None = None
        self._fixed_step = -1

    def _decode(self, vae: Any, z: torch.Tensor, spade: bool) -> torch.Tensor:
        if spade:
            if "use_spade" not in inspect.signature(vae.decode).parameters:
                raise PrepError(
                    f"train_spade: {type(vae).__name__}.decode takes no use_spade (it has no SPADE layers)",
                    "train_spade",
                    "set train_spade: false, or use a VAE whose decode(z, use_spade=True) conditions on z",
                )
            out = vae.decode(z, use_spade=True)
        else:
            out = vae.decode(z)
        return out.sample if hasattr(out, "sample") else out

    def losses(self, x: torch.Tensor, vae: Any, *, sample: bool, spade: bool) -> dict[str, Any]:
        """Reconstruction, KL and total of images `x` in [-1, 1] (a posterior sample, or its mode)."""
        post = vae.encode(x).latent_dist
        z = post.sample() if sample else post.mode()
        rec = self._decode(vae, z, spade)
        rec_loss = _recon_loss(self.o.loss, rec.float(), x.float())
        kl = post.kl().mean()
        return {"rec": rec, "rec_loss": rec_loss, "kl_loss": kl, "vae_loss": rec_loss + self.o.kl_weight * kl}

    def train_step(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
        x = _pixels(_field(batch, self.o.image_key, "vae")).to(ctx.device)
        if self._fixed_step != ctx.index:  # the sample grid shows this step's first images
            self._fixed, self._fixed_step = x[: self.o.sample_images].detach().cpu().clone(), ctx.index
        gan = bool(ctx.step.gan_training)
        spade = bool(ctx.step.train_spade)
        with ctx.autocast():  # through the VAE's DDP wrapper: its gradients are averaged over ranks
            out = ctx.forward_with(self.o.module, lambda v, x: self.losses(x, v, sample=True, spade=spade), x)
        metrics: dict[str, Any] = {k: out[k].detach() for k in ("rec_loss", "kl_loss")}
        loss = out["vae_loss"]
        if gan:
            disc = ctx.modules[self.o.discriminator]
            with ctx.autocast():
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(out["rec"].detach())).mean()
            ctx.backward(d_loss)
            ctx.optimizer_step(self.o.discriminator)
            params = [p for p in _base(disc).parameters() if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            try:
                with ctx.autocast():
                    g_loss = -disc(out["rec"]).mean()
            finally:
                for p in params:
                    p.requires_grad_(True)
            loss = loss + self.o.gan_weight * g_loss
            metrics.update(d_loss=d_loss.detach(), g_loss=g_loss.detach())
        ctx.backward(loss)
        metrics["vae_loss"] = loss.detach()
        return metrics

    def val_step(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
        x = _pixels(_field(batch, self.o.image_key, "vae")).to(ctx.device)
        out = self.losses(x, ctx.raw_modules[self.o.module], sample=False, spade=bool(ctx.step.train_spade))
        return {k: out[k] for k in ("vae_loss", "rec_loss", "kl_loss")}

    def sample(self, ctx: Any) -> np.ndarray | None:
        """The step's first images (top row) over their reconstructions (posterior mode)."""
        if self._fixed is None:
            return None
        x = self._fixed.to(ctx.device)
        rec = self.losses(x, ctx.raw_modules[self.o.module], sample=False, spade=bool(ctx.step.train_spade))
        return image_grid(torch.cat([x, rec["rec"]]), len(x))

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": self._fixed, "fixed_step": self._fixed_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._fixed, self._fixed_step = state["fixed"], int(state["fixed_step"])


# -------------------------------------------------------------------------------------------- flow
def _prep_manifests(
    cfg: PipelineConfig, dataset: str, missing_ok: bool = False
) -> Iterator[tuple[str, Any]]:
    """(dataset name, manifest) of every prep folder under `dataset` (`missing_ok`: folders without a
    manifest, or not there yet, are passed over)."""
    from prep.formats.manifest import MANIFEST_NAME, read_manifest
    from prep.pipeline.config import dataset_refs

    todo = [dataset]
    while todo:
        name = todo.pop()
        ds = cfg.datasets[name]
        todo += [ref for _, ref in dataset_refs(ds)]
        if isinstance(ds, PrepDatasetConfig):
            path = Path(ds.path)  # a folder, its manifest.json, or shards in it (a tar path or pattern)
            folder = path if path.is_dir() else path.parent
            if not missing_ok or (folder / MANIFEST_NAME).is_file():
                yield name, read_manifest(folder)


def _bf16_members(cfg: PipelineConfig, datasets: list[str]) -> set[str]:
    """Members that some prep folder under `datasets` stores as bfloat16 bit patterns in uint16
    (`store_dtype: bfloat16`: NumPy has no bfloat16, the loader hands the bits over as they are)."""
    from prep.formats.manifest import BF16_STORAGE

    return {
        member
        for d in datasets
        for _, manifest in _prep_manifests(cfg, d)
        for member, meta in manifest.fields.items()
        if (meta or {}).get("storage") == BF16_STORAGE
    }


Recorded = tuple[float, float, str, str | None]  # scaling, shift, latent_mode, the VAE's class + config hash


def _manifest_factors(cfg: PipelineConfig, dataset: str, key: str) -> Recorded | None:
    """(scaling, shift, latent_mode, VAE identity) that precache_encodings recorded for encoder `key`
    in the prep folders under `dataset` (None when no folder records it); folders that disagree are an
    error."""
    found: dict[Recorded, str] = {}
    for name, manifest in _prep_manifests(cfg, dataset):
        enc = manifest.encoders.get(key)
        if enc:
            mode = str((enc.get("settings") or {}).get("latent_mode", "moments"))
            sha = enc.get("config_sha256")
            vae = f"{str(enc.get('class')).rsplit('.', 1)[-1]} config {str(sha)[:12]}" if sha else None
            scale, shift = float(enc.get("scaling_factor", 1.0)), float(enc.get("shift_factor", 0.0))
            found[(scale, shift, mode, vae)] = name
    if len(found) > 1:
        raise PrepError(
            f"flow trainer: the datasets under {dataset!r} hold {key!r} latents of different VAEs: "
            + ", ".join(f"{n}: scale {s} shift {t} {m}" for (s, t, m, _), n in found.items()),
            cfg.place(("datasets", dataset)),
            "train on latents of one VAE",
        )
    return next(iter(found), None)


_TEXT_DEFAULTS = {"max_length": 32, "hidden_layer": None, "use_attention_mask": None}


def _manifest_text(cfg: PipelineConfig, key: str) -> tuple[dict[str, Any], str] | None:
    """(max_length, hidden_layer, use_attention_mask) that precache_encodings used for text encoder
    `key`, with the dataset that records them, from the prep folders of the datasets that read
    `<key>.npy` (None when none does); datasets that disagree are an error (the steps would train on
    two kinds of embedding)."""
    found: dict[tuple[Any, ...], str] = {}
    member = f"{key}.npy"
    for top, ds in cfg.datasets.items():  # every prep folder is a named dataset of its own
        if not isinstance(ds, PrepDatasetConfig) or (ds.fields is not None and member not in ds.fields):
            continue
        for name, manifest in _prep_manifests(cfg, top, missing_ok=True):
            enc = manifest.encoders.get(key)
            if enc:
                settings = enc.get("settings") or {}
                got = (enc.get("max_length", settings.get("max_length")), settings.get("hidden_layer"),
                       enc.get("use_attention_mask", settings.get("use_attention_mask")))
                found.setdefault(got, name)
    if len(found) > 1:
        raise PrepError(
            f"flow trainer: the datasets hold {key!r} text embeddings precached otherwise: "
            + "; ".join(f"{n}: max_length {m}, hidden_layer {h}" for (m, h, _), n in found.items()),
            cfg.source,
            f"precache {key!r} with the same max_length and hidden_layer everywhere",
        )
    if not found:
        return None
    (got, name), = found.items()
    return dict(zip(_TEXT_DEFAULTS, got, strict=True)), name


class FlowTrainer:
    """Rectified flow: x_t = (1 - t) x_0 + t e, the denoiser predicts e - x_0 (MSE), t ~ U(0, 1),
    conditioned on text embeddings (dropped to zeros with probability `cfg_dropout`)."""

    metrics = ("flow_loss",)

    def __init__(self, cfg: PipelineConfig, opts: FlowOptions, tokenizer: Any = None) -> None:
        self.cfg, self.o, self.tokenizer = cfg, opts, tokenizer
        self._factors: dict[int, tuple[float, float, str]] = {}
        self._recorded: dict[tuple[int, str | None], Recorded] = {}  # what each dataset's latents hold
        self._fixed: dict[str, Any] | None = None
        self._fixed_step = -1
        self._accepts_mask: bool | None = None
        self._bf16: dict[str | None, set[str]] = {}
        self._text_settings: dict[str, Any] | None = None

    # ------------------------------------------------------------------------ inputs
    def _source(self, ctx: Any, val: bool) -> str | None:
        """The dataset a batch comes from: the step's validation dataset, or its training dataset."""
        if val and ctx.step.validation is not None:
            return str(ctx.step.validation.dataset)
        return self.cfg.step_dataset(ctx.index)

    def stored(self, batch: Mapping[str, Any], member: str, ctx: Any, val: bool = False) -> torch.Tensor:
        """A precached member as float values: bfloat16 kept as uint16 bits is viewed as bfloat16 again
        (read as integers it would be numbers in the tens of thousands), as the manifest of the
        batch's own dataset (training or validation) records it."""
        t = torch.as_tensor(batch[member])
        if t.dtype == torch.uint16:
            name = self._source(ctx, val)
            if name not in self._bf16:
                self._bf16[name] = _bf16_members(self.cfg, [name] if name else [])
            if member not in self._bf16[name]:
                key = "validation.dataset" if val else "dataset"
                raise PrepError(
                    f"flow trainer: {member} holds uint16 and no manifest of step {ctx.step.name!r}'s "
                    f"{'validation ' if val else ''}data ({name!r}) records it as bfloat16 bits",
                    f"steps.{ctx.index}.{key}",
                    "precache it as float (store_dtype float32/float16), or keep its manifest.json beside it",
                )
            t = t.view(torch.bfloat16)
        return t.to(ctx.device).float()

    def recorded(self, ctx: Any, val: bool = False) -> Recorded:
        """(scaling, shift, latent_mode, VAE) that the batch's own dataset (training or validation)
        holds its latents with: its manifest's, else the VAE's config (moments, VAE unknown)."""
        name = self._source(ctx, val)
        if (ctx.index, name) not in self._recorded:
            found = _manifest_factors(self.cfg, name, self.o.latent_key) if name else None
            if found is None:
                vae_cfg = getattr(ctx.raw_modules.get(self.o.vae), "config", None)
                scale = float(getattr(vae_cfg, "scaling_factor", 1.0) or 1.0)
                shift = float(getattr(vae_cfg, "shift_factor", 0.0) or 0.0)
                found = (scale, shift, "moments", None)
            self._recorded[(ctx.index, name)] = found
        return self._recorded[(ctx.index, name)]

    def factors(self, ctx: Any) -> tuple[float, float, str]:
        """(scaling, shift, latent_mode) in force for the step: options > the training data's manifest >
        the VAE's config (validation latents are brought to these factors)."""
        if ctx.index not in self._factors:
            # read even when the options give both factors: the stored latent_mode still matters
            scale, shift, mode, _ = self.recorded(ctx)
            self._factors[ctx.index] = (
                self.o.scaling_factor if self.o.scaling_factor is not None else scale,
                self.o.shift_factor if self.o.shift_factor is not None else shift,
                mode,
            )
        return self._factors[ctx.index]

    def _check_validation(self, ctx: Any) -> None:
        """Refuse validation latents of another VAE than the training data's: no factor maps them."""
        train, val = self.recorded(ctx)[3], self.recorded(ctx, val=True)[3]
        if train is not None and val is not None and train != val:
            name = self._source(ctx, True)
            raise PrepError(
                f"{self.cfg.dotted(('steps', str(ctx.index), 'validation', 'dataset'))}: flow trainer: "
                f"step {ctx.step.name!r}'s validation dataset {name!r} holds "
                f"{self.o.latent_key!r} latents of another VAE ({val}) than its training data ({train}): "
                "no scaling or shift brings them to the factors in force",
                self.cfg.place(("steps", str(ctx.index), "validation", "dataset")),
                "precache the validation images with the training data's VAE, or validate on raw images",
            )

    def moments(self, batch: Mapping[str, Any], ctx: Any, val: bool = False) -> torch.Tensor:
        """The VAE moments (mean, logvar) of the batch: precached, else encoded now with the frozen VAE
        through prep.encoders' VaeEncoder (the precache stage's code: same pixels, same numbers)."""
        member = f"{self.o.latent_key}.npy"
        if member in batch:
            return self.stored(batch, member, ctx, val)
        from prep.encoders.models import VaeEncoder
        from prep.encoders.spec import EncoderConfig

        enc_cfg = EncoderConfig(
            key=self.o.latent_key, modality="image", model="diffusers:AutoencoderKL", pretrained=self.o.vae,
            resolution=self.o.resolution, latent_mode="moments",
        )
        encoder = VaeEncoder(enc_cfg, ctx.raw_modules[self.o.vae], ctx.device, 0)
        images = _field(batch, self.o.image_key, "flow")
        if isinstance(images, torch.Tensor):  # decoded by the loader: B x 3 x H x W uint8
            pixels = images.permute(0, 2, 3, 1).contiguous()
        else:  # raw bytes: decoded and resized exactly as precache_encodings does
            pixels = encoder.collate(encoder.preparer.prepare(list(images)))
        with torch.no_grad():
            out, _ = encoder.forward(pixels, list(batch.get("__key__", [])))[member]
        return out.float()

    def latents(self, batch: Mapping[str, Any], ctx: Any, val: bool = False) -> torch.Tensor:
        """x_0: a posterior sample of the moments, shifted and scaled as the flow expects. `val`: the
        batch is the validation dataset's, read as its own manifest records it."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        scale, shift, _ = self.factors(ctx)
        if val:
            self._check_validation(ctx)
        stored_scale, stored_shift, mode, _ = self.recorded(ctx, val)
        z = self.moments(batch, ctx, val)
        # precached as mean/sample: already shifted and scaled (raw images encoded now are moments,
        # whatever mode the folder's manifest records for its vae.npy)
        if mode != "moments" and f"{self.o.latent_key}.npy" in batch:
            if (stored_scale, stored_shift) == (scale, shift):
                return z
            return (z / stored_scale + stored_shift - shift) * scale  # the factors in force, applied once
        return (DiagonalGaussianDistribution(z).sample() - shift) * scale

    def _text_trainable(self, ctx: Any) -> bool:
        """Whether this step trains the text encoder, by the orchestrator's rule
        (`StepConfig.trained_modules`); when it does not, it is frozen and the precached embeddings are
        read (captions are encoded only where none are)."""
        te = self.o.text_encoder
        return te is not None and te in ctx.raw_modules and te in ctx.step.trained_modules

    def text(self, batch: Mapping[str, Any], ctx: Any,
             val: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings, mask or None): precached unless the text encoder trains in this step."""
        member = f"{self.o.text_key}.npy"
        if member in batch and not self._text_trainable(ctx):
            emb = self.stored(batch, member, ctx, val)
            mask = batch.get(f"{self.o.text_key}_mask.npy")
            return emb, (torch.as_tensor(mask).to(ctx.device).bool() if mask is not None else None)
        if self.o.text_encoder is None or self.o.text_encoder not in ctx.modules or self.tokenizer is None:
            raise PrepError(
                f"flow trainer: the batch has no {member!r} and there is no text encoder with a tokenizer",
                "trainer_options.flow.text_encoder",
                "precache the text embeddings, or name a text encoder in models: (with its tokenizer)",
            )
        encoder = self._text_encoder(ctx.raw_modules[self.o.text_encoder], ctx.device)
        raw = _field(batch, self.o.caption_key, "flow")
        captions = [c if isinstance(c, bytes) else str(c).encode() for c in raw]
        ids = encoder.collate(encoder.preparer.prepare(captions))
        # through the text encoder's DDP wrapper when it trains: its gradients are averaged over ranks
        out = ctx.forward_with(self.o.text_encoder, lambda _, tokens: encoder.forward(tokens, []), ids)
        return out[member][0].float(), out[f"{self.o.text_key}_mask.npy"][0].to(ctx.device)

    def text_settings(self) -> dict[str, Any]:
        """How captions are encoded on the fly: as the precached `<text_key>.npy` embeddings were
        (max_length, hidden_layer, whether the model saw the mask), so a step that trains the text
        encoder feeds the denoiser the same kind of embedding as the steps that read them; a
        `max_length` option that says otherwise is refused."""
        if self._text_settings is None:
            recorded = _manifest_text(self.cfg, self.o.text_key)
            settings = dict(recorded[0] if recorded else _TEXT_DEFAULTS)
            if self.o.max_length is not None:
                if recorded and self.o.max_length != settings["max_length"]:
                    path = ("trainer_options", "flow", "max_length")
                    raise PrepError(
                        f"{self.cfg.dotted(path)}: {self.o.max_length}, but dataset {recorded[1]!r} holds "
                        f"{self.o.text_key!r} embeddings precached with max_length {settings['max_length']}: "
                        "captions encoded on the fly would give the denoiser another kind of embedding",
                        self.cfg.place(path),
                        f"set it to {settings['max_length']} or remove it (it follows the precached ones)",
                    )
                settings["max_length"] = self.o.max_length
            self._text_settings = settings
        return self._text_settings

    def _text_encoder(self, module: torch.nn.Module, device: torch.device) -> Any:
        """precache's HFTextEncoder around the text-encoder module, with `text_settings` and a mask."""
        from prep.encoders.models import HFTextEncoder
        from prep.encoders.spec import EncoderConfig

        models = self.cfg.models or {}
        spec = models[te].class_ if (te := self.o.text_encoder) in models else "transformers:CLIPTextModel"
        enc_cfg = EncoderConfig(
            key=self.o.text_key, modality="text", model=spec, pretrained=self.o.text_encoder,
            padding="max_length", attention_mask=True, **self.text_settings(),
        )
        return HFTextEncoder(enc_cfg, module, self.tokenizer, device)

    def unreached(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The text encoder's trainable parameters its embeddings do not depend on (a CLIP
        ...WithProjection's text_projection), found by one caption's forward in eval mode. They never
        get a gradient here, and DDP expects one for every trainable parameter of a module it wraps."""
        params = [p for p in module.parameters() if p.requires_grad]
        if not params or self.tokenizer is None:
            return []
        encoder = self._text_encoder(module, params[0].device)
        training = module.training
        module.eval()
        try:
            with torch.enable_grad():
                emb = encoder.forward(encoder.collate(encoder.preparer.prepare([b"a"])), [])
                grads = torch.autograd.grad(emb[f"{self.o.text_key}.npy"][0].sum(), params, allow_unused=True)
        finally:
            module.train(training)
        return [p for p, g in zip(params, grads, strict=True) if g is None]

    # -------------------------------------------------------------------------- model
    def predict(self, ctx: Any, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                mask: torch.Tensor | None, *, raw: bool = False) -> torch.Tensor:
        """The denoiser's velocity (`raw`: the module itself, not its DDP wrapper: rank 0's samples)."""
        net = (ctx.raw_modules if raw else ctx.modules)[self.o.denoiser]
        if self._accepts_mask is None:
            self._accepts_mask = "encoder_attention_mask" in inspect.signature(_base(net).forward).parameters
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb}
        if mask is not None and self._accepts_mask:
            kwargs["encoder_attention_mask"] = mask
        out = net(x, t * self.o.timestep_scale, **kwargs)
        return (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).float()

    def loss(self, ctx: Any, x0: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None,
             drop: float) -> torch.Tensor:
        """The rectified-flow loss of latents x0 (random draws: caption drop, noise, t, in that order)."""
        b = x0.shape[0]
        if drop > 0:
            keep = (torch.rand(b) >= drop).to(ctx.device)
            emb = emb * keep.view(b, *[1] * (emb.dim() - 1)).to(emb.dtype)
        noise = torch.randn(x0.shape).to(ctx.device)
        t = torch.rand(b).to(ctx.device)
        tt = t.view(b, *[1] * (x0.dim() - 1))
        xt = (1 - tt) * x0 + tt * noise
        with ctx.autocast():
            pred = self.predict(ctx, xt, t, emb, mask)
        return F.mse_loss(pred, noise - x0)

    def train_step(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
        x0 = self.latents(batch, ctx)
        emb, mask = self.text(batch, ctx)
        if self._fixed_step != ctx.index:  # samples use this step's first captions
            n = self.o.sample_images
            self._fixed = {
                "emb": emb[:n].detach().cpu().clone(),
                "mask": mask[:n].detach().cpu().clone() if mask is not None else None,
                "shape": list(x0.shape[1:]),
            }
            self._fixed_step = ctx.index
        loss = self.loss(ctx, x0, emb, mask, self.o.cfg_dropout)
        ctx.backward(loss)
        return {"flow_loss": loss.detach()}

    def val_step(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
        keys = ",".join(map(str, batch.get("__key__", [])))
        torch.manual_seed(int.from_bytes(hashlib.sha256(keys.encode()).digest()[:8], "little") >> 1)
        x0 = self.latents(batch, ctx, val=True)  # (validation runs with torch's RNG forked)
        emb, mask = self.text(batch, ctx, val=True)
        return {"flow_loss": self.loss(ctx, x0, emb, mask, 0.0)}

    def sample(self, ctx: Any) -> np.ndarray | None:
        """`sample_steps` Euler steps from fixed noise (seed 0) for the step's first captions, with
        classifier-free guidance, decoded by the VAE: one row."""
        if self._fixed is None:
            return None
        emb = self._fixed["emb"].to(ctx.device)
        mask = self._fixed["mask"].to(ctx.device) if self._fixed["mask"] is not None else None
        n = emb.shape[0]
        x = torch.randn((n, *self._fixed["shape"]), generator=torch.Generator().manual_seed(0)).to(ctx.device)
        ts = torch.linspace(1.0, 0.0, self.o.sample_steps + 1)
        for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
            t = torch.full((n,), a, device=ctx.device)
            v_c = self.predict(ctx, x, t, emb, mask, raw=True)
            v_u = self.predict(ctx, x, t, torch.zeros_like(emb), mask, raw=True)
            x = x + (b - a) * (v_u + self.o.guidance * (v_c - v_u))
        scale, shift, _ = self.factors(ctx)
        images = ctx.raw_modules[self.o.vae].decode(x / scale + shift).sample
        return image_grid(images, n)

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": self._fixed, "fixed_step": self._fixed_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._fixed, self._fixed_step = state["fixed"], int(state["fixed_step"])


# ------------------------------------------------------------------------------------------ building
def build_reference(cfg: PipelineConfig) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """What `prep pipeline run` without --entry runs: the `models:` modules and the reference trainers."""
    from prep.pipeline.models import build_models

    modules = build_models(cfg)
    return modules, build_trainers(cfg, modules)


def needed_trainers(cfg: PipelineConfig) -> list[str]:
    return list(dict.fromkeys(t for s in cfg.steps for t in s.trainers))


def build_trainers(cfg: PipelineConfig, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """The reference trainers the steps name (`vae`, `flow`), with `trainer_options`."""
    from prep.pipeline.models import load_tokenizer_for

    unknown = [t for t in needed_trainers(cfg) if t not in REFERENCE_TRAINERS]
    if unknown:
        raise PrepError(
            f"no reference trainer for {', '.join(map(repr, unknown))} "
            f"(prep has {', '.join(REFERENCE_TRAINERS)})",
            cfg.source,
            "pass --entry module:build with your own trainers",
        )
    trained = {m for s in cfg.steps for m in s.trained_modules}
    out: dict[str, Any] = {}
    for name in needed_trainers(cfg):
        opts = options(cfg, name)
        wanted = [opts.module] if name == "vae" else [opts.denoiser, opts.vae]
        missing = [m for m in wanted if m not in modules]
        if missing:
            raise PrepError(
                f"the {name} trainer needs module(s) {', '.join(map(repr, missing))}, not in models:",
                cfg.place(("models",)),
                f"add them to models:, or set trainer_options.{name} to the names you use",
            )
        if name == "vae":
            out[name] = VAETrainer(opts)
        else:
            te = opts.text_encoder
            tok = load_tokenizer_for(cfg, te) if te and cfg.models and te in cfg.models else None
            out[name] = flow = FlowTrainer(cfg, opts, tok)
            if te is not None and te in modules and te in trained:  # frozen: no gradient ever reaches them
                for p in flow.unreached(modules[te]):
                    p.requires_grad_(False)
    return out
