"""Data and tiny training parts for pipeline tests, benchmarks and the example: the folders
`configs/pipelines/example.yaml` reads under DATA_ROOT (image folders with captions, WebDataset tars,
prep shard folders), two small torch modules, and a trainer that learns from shard keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prep.testing.loader_data import jpeg_bytes, make_shards


def image_folder(folder: str | Path, n: int, *, size: int = 8, prefix: str = "im") -> tuple[Path, Path]:
    """`n` JPEGs in `folder/images` and `folder/captions.txt` (NAME<TAB>CAPTION); returns both paths."""
    root = Path(folder)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{prefix}{i:04d}.jpg"
        (images / name).write_bytes(jpeg_bytes(i, size))
        lines.append(f"{name}\ta picture number {i}")
    captions = root / "captions.txt"
    captions.write_text("\n".join(lines) + "\n", "utf-8")
    return images, captions


def example_data(root: str | Path) -> Path:
    """Everything the example pipeline names, under `root` (pass it as DATA_ROOT)."""
    out = Path(root)
    image_folder(out / "256", 12)
    image_folder(out / "1024", 6)
    make_shards(out / "laion", [5, 5, 4], image_size=8, distinct_images=2)
    make_shards(out / "art", [6, 6], image_size=8, distinct_images=2)
    make_shards(out / "val", [4], image_size=8, distinct_images=1)
    return out


# ------------------------------------------------------------------------------- tiny training
def key_features(keys: list[str]) -> tuple[Any, Any]:
    """(inputs, targets) for a batch of make_shards keys (`sSSSSS_RRRRRR`), computed from the key alone:
    pipeline tests train on real batches without decoding images."""
    import torch

    nums = torch.tensor([[int(k[1:6]), int(k[7:13])] for k in keys], dtype=torch.float32)
    x = torch.cat([nums / 10.0, torch.sin(nums), torch.cos(nums)], dim=1)
    y = torch.stack([torch.sin(nums[:, 0] + nums[:, 1]), torch.cos(nums[:, 1] * 0.3)], dim=1)
    return x, y


def tiny_modules(seed: int = 0) -> dict[str, Any]:
    """Two small real torch modules (an encoder and a decoder), randomly initialised from `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    enc, dec = torch.nn.Linear(6, 8), torch.nn.Linear(8, 2)
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return {"enc": enc, "dec": dec}


class RegressionTrainer:
    """A trainer as the orchestrator expects one: regress key features through enc -> dec, with a
    little noise from torch's global RNG (so a resume must restore it), and remember every batch's keys
    in its state (so a test can compare the stream a run really trained on). With a log, each batch's
    line also holds a number drawn from python's and numpy's global RNGs and the batch's first torch
    noise value (so a test can compare the ranks' random streams)."""

    metrics = ("loss",)

    def __init__(self, log: str | Path | None = None, gate: str | Path | None = None) -> None:
        self.keys: list[list[str]] = []
        self.log = Path(log) if log is not None else None
        self.gate = Path(gate) if gate is not None else None  # while it exists, a step waits (logged)

    def _loss(self, batch: dict[str, Any], ctx: Any) -> tuple[Any, Any]:
        """The loss, and the noise drawn for it."""
        import torch

        x, y = key_features(list(batch["__key__"]))
        x, y = x.to(ctx.device), y.to(ctx.device)
        with ctx.autocast():
            out = ctx.modules["dec"](torch.tanh(ctx.modules["enc"](x)))
        noise = torch.randn_like(out.float())
        return ((out.float() + 0.01 * noise - y) ** 2).mean(), noise

    def train_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        loss, noise = self._loss(batch, ctx)
        ctx.backward(loss)
        self.keys.append(list(batch["__key__"]))
        if self.log is not None:
            import json
            import random

            import numpy as np

            draws = [random.random(), float(np.random.random()), float(noise.flatten()[0])]
            with open(self.log, "a") as f:
                doc = {"rank": ctx.rank, "batch": ctx.global_step, "keys": self.keys[-1], "draws": draws}
                f.write(json.dumps(doc) + "\n")
        while self.gate is not None and self.gate.exists():  # a test holds the run alive here
            import time

            time.sleep(0.05)
        return {"loss": loss.detach()}

    def val_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"loss": self._loss(batch, ctx)[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = [list(k) for k in state["keys"]]


def pipeline_run_args(config: str | Path, checkpoint_dir: str | Path, *extra: str,
                      entry: str = "prep.testing.pipeline_data:build") -> list[str]:
    """The arguments of `prep pipeline run` (after `prep`) that the kill, torchrun and CLI tests and
    bench/pipeline.py share: the config, the entry, the checkpoint folder, quiet, then `extra`."""
    return ["pipeline", "run", str(config), "--entry", entry, "--checkpoint-dir", str(checkpoint_dir),
            "--quiet", *extra]


def build(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `--entry` for `prep pipeline run`: tiny modules and a regression trainer called `reg` (its key
    log goes to $PREP_TEST_KEY_LOG when set, one file per rank; every step waits while the file
    $PREP_TEST_GATE exists)."""
    import os

    log = os.environ.get("PREP_TEST_KEY_LOG")
    rank = os.environ.get("RANK", "0")
    trainer = RegressionTrainer(f"{log}.rank{rank}" if log else None, os.environ.get("PREP_TEST_GATE"))
    return tiny_modules(0), {"reg": trainer}


# ------------------------------------------------------------------------- precached demo shards
def precached_shards(
    root: str | Path, per_shard: tuple[int, ...] = (4, 4, 4, 4, 4), *, size: int = 32,
    latent_mode: str = "moments", store_dtype: str = "auto", scaling_factor: float | None = None,
    shift_factor: float | None = None, text_settings: dict[str, Any] | None = None,
) -> Path:
    """A small `make shards` result without the HTTP and download stages: tiny models in `root/models`,
    and in `root/tarfiles_merged` shards 000000.tar... of `size` px JPEGs + captions with the
    precached `vae.npy` (`latent_mode`) and `clip.npy` (+ mask) members (both stored as
    `store_dtype`; the VAE's latents with `scaling_factor` / `shift_factor` when given, else the
    VAE's; the text encoder's with `text_settings` over max_length 32), `.idx` files and a manifest:
    what `configs/pipelines/demo.yaml` reads with
    PREP_DEMO_OUT=root. A VAE already in `root/models/vae` is kept (precache with another VAE)."""
    from prep.config import PrepConfig
    from prep.formats.tar_write import write_shard
    from prep.runtime.runner import run_stage
    from prep.stages.base import RunOptions
    from prep.testing.tiny_models import write_tiny_models

    out = Path(root)
    models = out / "models"
    write_tiny_models(models)
    raw = out / "raw"
    words = ["red", "blue", "cat", "dog", "photo", "sample"]
    n = 0
    for s, count in enumerate(per_shard):
        samples = []
        for _ in range(count):
            caption = f"a {words[n % 6]} {words[(n // 6) % 6]} number {n}"
            samples.append((f"{n:06d}", {"jpg": jpeg_bytes(n, size), "txt": caption.encode()}))
            n += 1
        write_shard(raw / f"{s:06d}.tar", samples)
    encoders = [
        {"key": "vae", "modality": "image", "source": "jpg", "model": "diffusers:AutoencoderKL",
         "pretrained": str(models), "subfolder": "vae", "resolution": size,
         "latent_mode": latent_mode, "store_dtype": store_dtype, "scaling_factor": scaling_factor,
         "shift_factor": shift_factor},
        {"key": "clip", "modality": "text", "source": "txt", "model": "transformers:CLIPTextModel",
         "pretrained": str(models), "subfolder": "text_encoder", "max_length": 32, "padding": "max_length",
         "attention_mask": True, "store_dtype": store_dtype, **(text_settings or {})},
    ]
    section = {"input_dir": str(raw), "output_dir": str(out / "tarfiles_merged"), "keep_source": True,
               "batch_size": 8, "num_workers": 0, "device": "cpu", "encoders": encoders}
    run_stage("precache_encodings", PrepConfig.model_validate({"precache_encodings": section}),
              RunOptions(quiet=True))
    return out / "tarfiles_merged"


# ------------------------------------------------------------------- reference trainers, per rank
def sharp_vae(**config: Any) -> Any:
    """A `diffusers.AutoencoderKL(**config)` whose posterior has std exp(-15) (logvar held below the
    clamp at -30): its samples are its mean to ~1e-6, so runs whose ranks draw different noise (each
    rank its own RNG) train the same numbers, and a 2-rank run can be compared with a 1-rank run."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config)
    half = vae.config.latent_channels
    with torch.no_grad():  # the logvar half of quant_conv's output: -100 whatever the input
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(-100.0)
    return vae


def zero_latent_vae(folder: str | Path) -> Path:
    """The tiny AutoencoderKL of `write_tiny_models` saved to `folder` with its posterior mean held at 0
    (quant_conv's weights and bias zeroed): precached with `latent_mode: mean`, every latent is 0."""
    import torch
    from diffusers import AutoencoderKL

    from prep.testing.tiny_models import write_tiny_vae

    out = write_tiny_vae(Path(folder))
    vae = AutoencoderKL.from_pretrained(str(out))
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.zero_()
    vae.save_pretrained(str(out))
    return out


def noise_echo(channels: int, width: int) -> Any:
    """A denoiser for latents x_0 = 0: from x_t = t e it returns e (x_t / t) plus a linear map of the
    caption's mean text embedding, so the flow loss is that map's mean square whatever noise and t each
    rank draws (a 2-rank run trains the numbers of a 1-rank run with the same global batch), and its
    gradient reaches the text encoder."""
    import torch

    class NoiseEcho(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(width, channels)

        def forward(
            self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            h = self.proj(encoder_hidden_states.mean(dim=1))
            return x / t.view(-1, 1, 1, 1) + h.view(*h.shape, 1, 1)

    return NoiseEcho()


def reference_build(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `--entry` that builds what `prep pipeline run` without one builds (`models:` and the reference
    trainers); with $PREP_TEST_WEIGHTS set, each rank saves its modules' weights at exit to
    `$PREP_TEST_WEIGHTS.rank<r>.pt` (checkpoints hold rank 0's only)."""
    import atexit
    import os

    import torch

    from prep.pipeline.trainers import build_reference

    modules, trainers = build_reference(config)
    out = os.environ.get("PREP_TEST_WEIGHTS")
    if out:
        path = f"{out}.rank{os.environ.get('RANK', '0')}.pt"
        atexit.register(lambda: torch.save({n: m.state_dict() for n, m in modules.items()}, path))
    return modules, trainers
