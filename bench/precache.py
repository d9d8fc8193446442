"""precache_encodings benchmark: the whole stage (read shards, decode + resize in DataLoader workers,
batched VAE forward, .npy + tar writes in the writer thread, markers, manifest) against the bare
model's forward on pre-decoded tensors of the same batch size, in the same run.

ratio = pipeline images/s / bare model images/s (target >= 0.9: the pipeline adds little).

Model: a randomly initialised diffusers AutoencoderKL (real architecture, nothing downloaded). The
default is a reduced-width VAE at 128 px so the CPU run stays around two minutes; `--sd-size` builds
Stable Diffusion's VAE (block_out_channels 128/256/512/512, 2 layers per block). On a GPU:
  python bench/precache.py --device cuda --dtype bfloat16 --sd-size --resolution 256 512 --images 2048
Data: JPEGs (smooth gradients + noise, 1.2-1.6x the target side, mixed aspect) in shards of
`--per-shard` samples, with captions. Every figure is the median of `--repeats` runs, the bare and
the pipeline runs interleaved; each is run once untimed first (model load, warm-up).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _report import Measure, record  # bench/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from PIL import Image  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.formats.tar_write import write_shard  # noqa: E402
from prep.runtime.runner import run_stage  # noqa: E402
from prep.stages.base import RunOptions  # noqa: E402

STAGE = "precache_encodings"


def write_vae(folder: Path, sd_size: bool) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if sd_size:
        kw = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
    else:
        kw = {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "norm_num_groups": 32}
    n = len(kw["block_out_channels"])
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **kw,
    ).save_pretrained(str(folder))
    return folder


def make_shards(folder: Path, n_images: int, per_shard: int, resolution: int, seed: int = 0) -> list[bytes]:
    """Shards of JPEG + caption; returns the JPEG bytes in order (for the bare-model side)."""
    rng = np.random.default_rng(seed)
    jpgs: list[bytes] = []
    for s in range(0, n_images, per_shard):
        samples = []
        for i in range(s, min(s + per_shard, n_images)):
            w = int(resolution * rng.uniform(1.2, 1.6))
            h = int(resolution * rng.uniform(1.2, 1.6))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (c + 1) * 255 // w + yy * 255 // h) % 256 for c in range(3)], -1)
            img = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            jpgs.append(buf.getvalue())
            samples.append((f"{i:09d}", {"jpg": jpgs[-1], "txt": f"image {i}".encode()}))
        write_shard(folder / f"{s // per_shard:05d}.tar", samples, fsync=False)
    return jpgs


def bare_model(vae_dir: Path, jpgs: list[bytes], cfg, args) -> Callable[[], float]:
    """A timer of the bare forward (images/s) on pre-decoded, pre-normalised tensors on the device."""
    import torch
    from diffusers import AutoencoderKL

    from prep.encoders.images import prepare_image

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval().requires_grad_(False)
    x = torch.stack([torch.from_numpy(prepare_image(j, cfg)) for j in jpgs]).permute(0, 3, 1, 2)
    x = (x.float() / 127.5 - 1).to(device)
    batches = list(torch.split(x, args.batch_size))

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for b in batches:
                vae.encode(b).latent_dist.parameters  # noqa: B018 - the forward is the work
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(jpgs) / (time.perf_counter() - t)

    once()  # warm-up (cuDNN autotune, allocator)
    return once


class GpuUtil:
    """Mean GPU utilisation sampled every 100 ms while a run is going (needs pynvml; else n/a)."""

    def __init__(self, device: str) -> None:
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.ok = device.startswith("cuda")

    def __enter__(self) -> GpuUtil:
        if self.ok:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        import torch

        while not self.stop.wait(0.1):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # pynvml missing
                self.ok = False
                return

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f}%" if self.ok and self.samples else "n/a"


def pipeline(work: Path, vae_dir: Path, args, resolution: int) -> Callable[[], tuple[float, str]]:
    """A timer of the whole stage (images/s, GPU utilisation), model already loaded."""
    enc = {
        "key": "vae",
        "modality": "image",
        "model": "diffusers:AutoencoderKL",
        "pretrained": str(vae_dir),
        "resolution": resolution,
        "dtype": args.dtype,
    }
    section = {
        "input_dir": str(work / "in"),
        "output_dir": str(work / "out"),
        "encoders": [enc],
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": args.device,
        "shards_per_task": args.shards_per_task,
    }
    cfg = PrepConfig.model_validate({STAGE: section})
    n = len(list((work / "in").glob("*.tar")))

    def once() -> tuple[float, str]:
        shutil.rmtree(work / "out", ignore_errors=True)
        with GpuUtil(args.device) as util:
            t = time.perf_counter()
            run = run_stage(STAGE, cfg, RunOptions(quiet=True, force=True))
            dt = time.perf_counter() - t
        if not run.ok:
            raise SystemExit(f"pipeline failed: {run.to_json()['errors'][:3]}")
        assert run.counts()["samples_out"] == args.images and len(run.results) * args.shards_per_task >= n
        return args.images / dt, util.mean()

    once()  # warm-up: loads the model into the per-process cache
    return once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--sd-size", action="store_true", help="Stable Diffusion's VAE architecture (random weights)"
    )
    p.add_argument("--resolution", type=int, nargs="+", default=[128])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--shards-per-task", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} gpu={gpu} torch={torch.__version__}"
    )
    print(
        f"model: AutoencoderKL {'SD-size' if args.sd_size else 'reduced-width'} (random weights), "
        f"dtype={args.dtype}, batch={args.batch_size}, workers={args.num_workers}; data: {args.images} JPEGs "
        f"in shards of {args.per_shard}; medians of {args.repeats}"
    )
    measures: list[Measure] = []
    sizes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prep-bench-precache-") as tmp:
        vae_dir = write_vae(Path(tmp) / "vae", args.sd_size)
        for res in args.resolution:
            work = Path(tmp) / f"r{res}"
            jpgs = make_shards(work / "in", args.images, args.per_shard, res)
            mb = sum(map(len, jpgs)) / 1e6
            enc_cfg = (
                PrepConfig
                .model_validate(
                    {
                        STAGE: {
                            "encoders": [
                                {
                                    "key": "vae",
                                    "modality": "image",
                                    "model": "diffusers:AutoencoderKL",
                                    "pretrained": "x/y",
                                    "resolution": res,
                                }
                            ]
                        }
                    }
                )
                .precache_encodings.encoders[0]
            )
            bare_once = bare_model(vae_dir, jpgs, enc_cfg, args)
            pipe_once = pipeline(work, vae_dir, args, res)
            bares, pipes = [], []
            for _ in range(args.repeats):  # interleaved: drifting load from other processes hits both alike
                bares.append(bare_once())
                pipes.append(pipe_once())
            bare, piped = statistics.median(bares), statistics.median(p[0] for p in pipes)
            util = sorted(pipes)[len(pipes) // 2][1]
            task = f"VAE encode, {res} px"
            measures += [Measure(task, "prep", "images/s", [q[0] for q in pipes], True),
                         Measure(task, "bare model forward (pre-decoded)", "images/s", bares, True)]
            sizes.append(f"{res} px: {mb:.1f} MB of JPEG")
            print(
                f"{res:>4} px ({mb:.1f} MB of JPEG): peer = bare model forward on pre-decoded tensors "
                f"{bare:8.1f} img/s | prep pipeline {piped:8.1f} img/s | ratio {piped / bare:.2f} "
                f"(target >= 0.9) | GPU util {util}"
            )
    record("precache", "precache_encodings: the whole pipeline vs the bare model on pre-decoded tensors",
           f"{args.images} JPEGs in shards of {args.per_shard} ({'; '.join(sizes)}), AutoencoderKL "
           f"{'SD-size' if args.sd_size else 'reduced-width'} (random weights), {args.dtype}, batch "
           f"{args.batch_size}, device {args.device} ({gpu}); {args.repeats} runs each", measures,
           ["target: the pipeline >= 0.9 of the bare model"])


if __name__ == "__main__":
    main()
