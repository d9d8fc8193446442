"""What precaching buys: the reference flow trainer's throughput on precached latents + text embeddings
against the same training on raw images and captions encoded on the fly by the frozen VAE and text
encoder (samples/s, CPU by default, `--device cuda` on a GPU).

Data: `prep.testing.pipeline_data.precached_shards` (the demo's road without HTTP: 64 px JPEGs and
captions, precache_encodings with the demo's tiny AutoencoderKL and CLIPTextModel). Models: those
encoders and the denoiser of configs/pipelines/demo.yaml (its `models.flow_processor`). Both runs use
the same trainer class (`prep.pipeline.trainers.FlowTrainer`), loader settings, batch size, optimizer
and denoiser; only the batch's members differ (`vae.npy`/`clip.npy` vs `jpg`/`txt`), so the ratio is
the cost of decoding + encoding. Rounds alternate precached / raw; medians of per-round samples/s.
`--vae tiny` is the demo's VAE (2 levels, 8-16 channels: encoding costs little next to the denoiser);
`--vae sd` precaches and encodes with a randomly initialised AutoencoderKL of Stable Diffusion's shape
(4 levels, 128-512 channels, 8x downsampling), which is what precaching saves in practice.

Run: `python bench/flow_precache.py` (`--quick`: a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prep.testing.pipeline_data import precached_shards  # noqa: E402

DEMO = ROOT / "configs" / "pipelines" / "demo.yaml"


SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215,
}


def _setup(root: Path, samples: int, device: str, vae: str):
    from prep.pipeline import parse_pipeline_config
    from prep.pipeline.models import build_models
    from prep.pipeline.orchestrator import StepContext
    from prep.pipeline.trainers import FlowTrainer, options

    if vae == "sd":  # written before precached_shards, which keeps an existing models/vae
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE).save_pretrained(str(root / "models" / "vae"))
    shards = precached_shards(root, tuple([samples // 4] * 4), size=64)
    os.environ["PREP_DEMO_OUT"] = str(root)
    models = {
        "vae": {"class": "diffusers:AutoencoderKL", "pretrained": str(root / "models"), "subfolder": "vae"},
        "text_encoder": {"class": "transformers:CLIPTextModel", "pretrained": str(root / "models"),
                         "subfolder": "text_encoder"},
    }
    demo = parse_pipeline_config(DEMO)
    assert demo.models is not None
    models["flow_processor"] = demo.models["flow_processor"].model_dump(by_alias=True, exclude_none=True)
    cfg = parse_pipeline_config({
        "models": models,
        "trainer_options": {"flow": {"resolution": 64}},
        "datasets": {"d": {"type": "prep", "path": str(shards)}},
        "default_dataset": "d",
        "defaults": {"seed": 0},
        "steps": [{"name": "flow", "n_epochs": 1, "train_diff": True, "freeze": ["vae", "text_encoder"],
                   "optimization": {"optimizers": {"flow_processor": {"type": "AdamW", "lr": 1e-4}}}}],
    })
    modules = {n: m.to(device) for n, m in build_models(cfg).items()}
    for n in ("vae", "text_encoder"):
        modules[n].eval().requires_grad_(False)
    from prep.pipeline.models import load_tokenizer_for

    trainer = FlowTrainer(cfg, options(cfg, "flow"), load_tokenizer_for(cfg, "text_encoder"))
    opt = torch.optim.AdamW(modules["flow_processor"].parameters(), lr=1e-4)
    ctx = StepContext(cfg.steps[0], 0, modules, modules, {"flow_processor": opt}, {}, torch.device(device),
                      0, 1)
    return shards, trainer, ctx, opt


def _loader(shards: Path, fields: list[str], decode: str, batch: int, workers: int):
    from prep.loaders import DataLoader, ShardDataset

    ds = ShardDataset(shards, batch_size=batch, fields=fields, decode=decode, seed=0)  # type: ignore[arg-type]
    return DataLoader(ds, num_workers=workers, persistent_workers=workers > 0)


def _round(loader, trainer, ctx, opt, device: str) -> float:
    n = 0
    start = time.perf_counter()
    for batch in loader:
        trainer.train_step(batch, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(batch["__key__"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vae", choices=["tiny", "sd"], default="tiny")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.rounds = 64, 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards, trainer, ctx, opt = _setup(Path(tmp), args.samples, args.device, args.vae)
        loaders = {
            "precached": _loader(shards, ["vae.npy", "clip.npy", "clip_mask.npy"], "uint8", args.batch,
                                 args.workers),
            "raw (encode on the fly)": _loader(shards, ["jpg", "txt"], "raw", args.batch, args.workers),
        }
        for loader in loaders.values():  # warm-up: one pass each
            _round(loader, trainer, ctx, opt, args.device)
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(_round(loader, trainer, ctx, opt, args.device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    pre, raw = med["precached"], med["raw (encode on the fly)"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, device {args.device}, vae {args.vae}; {args.samples} samples of 64 px, "
          f"batch {args.batch}, workers {args.workers}, {args.rounds} rounds")
    for k, v in rates.items():
        print(f"  {k:26s} {med[k]:8.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"  precached / on the fly: {pre / raw:.2f}x")
    print(json.dumps({"precached_sps": pre, "raw_sps": raw, "ratio": pre / raw}))


if __name__ == "__main__":
    main()
