"""The demo training pipeline (configs/pipelines/demo.yaml) with your own trainers: the `--entry` path.

`build(config)` returns (modules, trainers): the modules come from the YAML's `models:` section (prep's
loader), the trainers are the two short classes below instead of prep's reference ones. Any object with
`train_step(batch, ctx) -> metrics` is a trainer; `ctx.backward(loss)` and the orchestrator steps the
optimizers, checkpoints, resumes on the exact next batch, and writes `sample()` pictures.

Run (after `make shards`):
    PYTHONPATH=examples prep pipeline run configs/pipelines/demo.yaml --entry train_pipeline:build \
        --checkpoint-dir runs/demo-custom
or: python examples/train_pipeline.py [--stop-after N]  (the same through TrainingPipelineOrchestrator)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prep.pipeline import TrainingPipelineOrchestrator, parse_pipeline_config
from prep.pipeline.models import build_models

DEMO = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.yaml"


class ReconTrainer:
    """The VAE on MSE reconstruction of its posterior sample (no KL, no GAN: the shortest useful loss)."""

    metrics = ("vae_loss", "rec_loss")

    def train_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        x = batch["jpg"].to(ctx.device) * 2 - 1
        rec = ctx.modules["vae"](x, sample_posterior=True).sample
        loss = F.mse_loss(rec, x)
        ctx.backward(loss)
        return {"vae_loss": loss.detach(), "rec_loss": loss.detach()}

    def val_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        x = batch["jpg"].to(ctx.device) * 2 - 1
        return {"vae_loss": F.mse_loss(ctx.modules["vae"](x).sample, x)}


class LatentFlowTrainer:
    """Rectified flow on the precached latent means (scaled by the VAE's factor) and CLIP embeddings."""

    metrics = ("flow_loss",)

    def train_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        moments = batch["vae.npy"].to(ctx.device)
        scale = ctx.raw_modules["vae"].config.scaling_factor
        x0 = moments[:, : moments.shape[1] // 2] * scale
        noise = torch.randn_like(x0)
        t = torch.rand(x0.shape[0], device=ctx.device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pred = ctx.modules["flow_processor"](xt, t * 1000, encoder_hidden_states=batch["clip.npy"]).sample
        loss = F.mse_loss(pred, noise - x0)
        ctx.backward(loss)
        return {"flow_loss": loss.detach()}


def build(config: Any) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The --entry function: modules from `models:`, your trainers under the names the steps use."""
    return build_models(config), {"vae": ReconTrainer(), "flow": LatentFlowTrainer()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEMO)
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("runs/demo-custom"))
    ap.add_argument("--stop-after", type=int, default=None)
    args = ap.parse_args()
    cfg = parse_pipeline_config(args.config)
    modules, trainers = build(cfg)
    orch = TrainingPipelineOrchestrator(cfg, modules, trainers, args.checkpoint_dir, device="cpu")
    orch.run(max_batches=args.stop_after)


if __name__ == "__main__":
    main()
