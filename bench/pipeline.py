"""Pipeline benchmark: what the orchestrator costs on top of a hand-written loop, how long a resume
takes at different positions, and what an atomic checkpoint costs against a bare `torch.save`.

1. Overhead per training step: the same model, data, optimizer and loader (prep shards, batch 32,
   0 workers) trained by a hand loop (`for batch in loader: loss.backward(); opt.step(); ...`) and by
   the orchestrator (one step, no checkpoints inside it). The model's compute is calibrated to
   `--step-ms` (default 20 ms); per-iteration times (batch fetch to batch fetch) are compared by their
   medians, rounds alternating hand / orchestrator. Times are this process's CPU time (1 torch thread,
   0 workers: all the work is in it), which other jobs on a shared machine do not inflate as they do
   wall time. Target: <= 2%. `--step-ms 1` shows the bookkeeping alone.
2. Resume time: a run stopped after K batches (K = 10 ... 30,000, one epoch of 48,000 batches) is
   resumed in a fresh process; time from process start to the first trained batch. A replaying
   resume (FluxFlow's, accelerate's skip) grows with K; prep's should be flat.
3. Checkpoint write: the orchestrator's checkpoint (atomic: temp file, fsync, rename; plus RNG,
   loader and metric state) against a bare `torch.save` of the same module and optimizer states,
   for a ~25M-parameter model with AdamW state.

Run: `python bench/pipeline.py` (`--quick`: a smoke run). Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prep.testing.loader_data import make_shards  # noqa: E402
from prep.testing.pipeline_data import key_features, pipeline_run_args  # noqa: E402


# ---------------------------------------------------------------------------------- 1. overhead
class Busy(torch.nn.Module):
    """A model whose forward + backward takes about the calibrated time on this machine."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, width)
        self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.out = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.body(torch.tanh(self.inp(x)))))


def calibrate(step_ms: float, batch: int) -> tuple[int, int]:
    width = 512
    for depth in range(1, 200):
        model = Busy(width, depth)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, 6), torch.randn(batch, 2)
        times = []
        for _ in range(7):
            t = time.process_time()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.process_time() - t)
        if statistics.median(times) * 1000 >= step_ms:
            return width, depth
    return width, 200


class Trainer:
    metrics = ("loss",)

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def train_step(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        self.stamps.append(time.process_time())
        x, y = key_features(list(batch["__key__"]))
        loss = ((ctx.modules["m"](x) - y) ** 2).mean()
        ctx.backward(loss)
        return {"loss": loss.detach()}


def _pipeline(data: Path, steps: int, batch: int, **step: Any) -> Any:
    from prep.pipeline import parse_pipeline_config

    return parse_pipeline_config(
        {
            "datasets": {"d": {"type": "prep", "path": str(data), "decode": "raw", "batch_size": batch}},
            "default_dataset": "d",
            "defaults": {"workers": 0, "seed": 0},
            "steps": [
                {
                    "name": "s",
                    "max_steps": steps,
                    "train": ["t"],
                    "checkpoint_every": f"{10 * steps}ba",
                    "optimization": {"optimizers": {"m": {"type": "SGD", "lr": 1e-3}}},
                    **step,
                }
            ],
        }
    )


def hand_loop(data: Path, steps: int, batch: int, width: int, depth: int) -> list[float]:
    from prep.loaders import DataLoader, ShardDataset

    torch.manual_seed(0)
    model = Busy(width, depth)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(ShardDataset(data, batch_size=batch, decode="raw", seed=0), num_workers=0)
    stamps: list[float] = []
    losses: list[float] = []
    while len(stamps) < steps:
        for b in loader:
            stamps.append(time.process_time())
            x, y = key_features(list(b["__key__"]))
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # a loop logs its loss
            if len(stamps) == steps:
                break
    return stamps


def orchestrated(data: Path, steps: int, batch: int, width: int, depth: int, folder: Path) -> list[float]:
    from prep.pipeline.orchestrator import TrainingPipelineOrchestrator

    torch.manual_seed(0)
    trainer = Trainer()
    orch = TrainingPipelineOrchestrator(
        _pipeline(data, steps, batch),
        {"m": Busy(width, depth)},
        {"t": trainer},
        folder,
        resume="never",
        progress=False,
    )
    orch.run()
    return trainer.stamps


def per_step(stamps: list[float], warmup: int = 3) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]


# ------------------------------------------------------------------------------------ 2. resume
RESUME_ENTRY = """
import json, os, time
import torch
from prep.testing.pipeline_data import key_features

class Stamp:
    metrics = ("loss",)
    def train_step(self, batch, ctx):
        path = os.environ["BENCH_FIRST"]
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump({"t": time.time()}, f)
        x, y = key_features(list(batch["__key__"]))
        loss = ((ctx.modules["m"](x) - y) ** 2).mean()
        ctx.backward(loss)
        return {"loss": loss.detach()}

def build(config):
    torch.manual_seed(0)
    return {"m": torch.nn.Linear(6, 2)}, {"t": Stamp()}
"""


def resume_in_process(config: Path, folder: Path, entry_dir: Path) -> float:
    """Orchestrator construction + run() to the first trained batch, in a warm process (what is left
    when the interpreter and torch are already loaded)."""
    import importlib
    import shutil

    from prep.pipeline import parse_pipeline_config
    from prep.pipeline.orchestrator import TrainingPipelineOrchestrator

    sys.path.insert(0, str(entry_dir))
    entry = importlib.import_module("bench_entry")
    scratch = folder.parent / f"{folder.name}-warm"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(folder, scratch)
    first = folder.parent / f"warm-{time.time_ns()}.json"
    os.environ["BENCH_FIRST"] = str(first)
    t0 = time.time()
    cfg = parse_pipeline_config(config)
    modules, trainers = entry.build(cfg)
    TrainingPipelineOrchestrator(cfg, modules, trainers, scratch, progress=False).run(max_batches=1)
    return json.loads(first.read_text())["t"] - t0


def resume_time(config: Path, folder: Path, entry_dir: Path) -> float:
    first = folder.parent / f"first-{time.time_ns()}.json"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{entry_dir}",
        "OMP_NUM_THREADS": "1",
        "BENCH_FIRST": str(first),
    }
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "prep.cli",
         *pipeline_run_args(config, folder, "--stop-after", "1", entry="bench_entry:build")],
        env=env,
        check=True,
    )
    return json.loads(first.read_text())["t"] - t0


# -------------------------------------------------------------------------------- 3. checkpoint
def checkpoint_costs(folder: Path, repeats: int, quick: bool) -> dict[str, float]:
    from prep.pipeline import orchestrator as orch_mod
    from prep.pipeline.orchestrator import TrainingPipelineOrchestrator

    data = folder / "ckdata"
    make_shards(data, [64], image_size=8, distinct_images=1)
    width = 1024 if quick else 2500  # 4 layers: ~4M / ~25M parameters

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, width),
            *[torch.nn.Linear(width, width) for _ in range(4)],
            torch.nn.Linear(width, 2),
        )

    times: list[float] = []
    bare: list[float] = []
    bare_sync: list[float] = []
    real_save = orch_mod._StepRun.save

    def bare_saves(self: Any) -> None:
        payload = {
            "model": self.o.modules["m"].state_dict(),
            "optimizer": {n: o.state_dict() for n, o in self.ctx.optimizers.items()},
        }
        # each to a new file, the one from two saves ago deleted: what prep does with keep_last=2 (on a
        # VM, writing fresh pages costs far more than overwriting a file in place)
        i = len(times)
        for kind, out in (("bare", bare), ("sync", bare_sync)):
            (folder / f"{kind}-{i - 2}.pt").unlink(missing_ok=True)
            t = time.perf_counter()
            torch.save(payload, folder / f"{kind}-{i}.pt")
            if kind == "sync":
                fd = os.open(folder / f"{kind}-{i}.pt", os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            out.append(time.perf_counter() - t)

    def timed(self: Any, step_end: bool = False) -> None:
        """prep's save, and beside it (before it on every other save, so neither always follows the
        other's writes) bare torch.save and torch.save + fsync of the same module and optimizer states;
        the step-end checkpoint (no optimizer) is not counted."""
        if step_end:
            real_save(self, step_end)
            return
        first = len(times) % 2 == 1
        if first:
            bare_saves(self)
        t = time.perf_counter()
        real_save(self, step_end)
        times.append(time.perf_counter() - t)
        if not first:
            bare_saves(self)

    orch_mod._StepRun.save = timed  # type: ignore[method-assign]
    try:
        cfg = _pipeline(
            data,
            repeats,
            4,
            checkpoint_every="1ba",
            optimization={"optimizers": {"m": {"type": "AdamW", "lr": 1e-4}}},
        )
        m = model()
        TrainingPipelineOrchestrator(
            cfg, {"m": m}, {"t": Trainer()}, folder / "ck", resume="never", progress=False, keep_last=2
        ).run()
    finally:
        orch_mod._StepRun.save = real_save  # type: ignore[method-assign]
    size = max(p.stat().st_size for p in folder.glob("bare-*.pt"))
    return {
        "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
        "size_MB": size / 1e6,
        "prep_s": statistics.median(times),
        "torch_save_s": statistics.median(bare),
        "torch_save_fsync_s": statistics.median(bare_sync),
    }


# ------------------------------------------------------------------------------------------ main
def overhead(a: argparse.Namespace, work: Path) -> None:
    data = work / "data"
    if not data.exists():
        make_shards(data, [2000] * 4, image_size=8, distinct_images=1)
    steps, rounds, batch = (60, 2, 32) if a.quick else (150, 6, 32)
    width, depth = calibrate(a.step_ms, batch)
    hand, orch = [], []
    for r in range(rounds):  # the order alternates, so a drift in the machine's load hits both
        runs = [
            lambda: hand.extend(per_step(hand_loop(data, steps, batch, width, depth))),
            lambda r=r: orch.extend(per_step(orchestrated(data, steps, batch, width, depth, work / f"o{r}"))),
        ]
        for run in runs if r % 2 == 0 else runs[::-1]:
            run()
    mh, mo = statistics.median(hand), statistics.median(orch)
    print(f"\n1. overhead per step ({steps} steps x {rounds} rounds, batch {batch}, model {width}x{depth}):")
    print(
        f"   CPU per step: hand loop {mh * 1000:.2f} ms, orchestrator {mo * 1000:.2f} ms: "
        f"overhead {100 * (mo / mh - 1):+.2f}% ({(mo - mh) * 1e6:+.0f} us/step; target <= 2%)"
    )


def resume(a: argparse.Namespace, work: Path) -> None:
    big = work / "big"
    if not big.exists():
        make_shards(big, [16000] * 12, image_size=8, distinct_images=1)  # 192,000 samples
    entry_dir = work / "entry"
    entry_dir.mkdir(exist_ok=True)
    (entry_dir / "bench_entry.py").write_text(RESUME_ENTRY)
    config = work / "resume.yaml"
    config.write_text(
        json.dumps(
            {
                "datasets": {"d": {"type": "prep", "path": str(big), "decode": "raw", "batch_size": 4}},
                "default_dataset": "d",
                "defaults": {"workers": 0, "seed": 0},
                "steps": [
                    {
                        "name": "s",
                        "n_epochs": 1,
                        "train": ["t"],
                        "checkpoint_every": "1000000ba",
                        "optimization": {"optimizers": {"m": {"type": "SGD", "lr": 1e-3}}},
                    }
                ],
            }
        )
    )
    positions = [10, 1000] if a.quick else [10, 1000, 10000, 30000]
    print("\n2. resume: start -> first trained batch (median of 5), 48,000 batches per epoch:")
    base = None
    for k in positions:
        folder = work / f"resume-{k}"
        if not folder.exists():
            env = {
                **os.environ,
                "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{entry_dir}",
                "OMP_NUM_THREADS": "1",
                "BENCH_FIRST": str(work / "ignore.json"),
            }
            subprocess.run(
                [sys.executable, "-m", "prep.cli",
                 *pipeline_run_args(config, folder, "--stop-after", str(k), entry="bench_entry:build")],
                env=env,
                check=True,
            )
        runs, warm = [], []
        for _ in range(5):
            scratch = work / f"resume-{k}-copy"
            subprocess.run(["rm", "-rf", str(scratch)], check=True)
            subprocess.run(["cp", "-r", str(folder), str(scratch)], check=True)
            runs.append(resume_time(config, scratch, entry_dir))
            warm.append(resume_in_process(config, folder, entry_dir))
        med, wmed = statistics.median(runs), statistics.median(warm)
        base = base or (med, wmed)
        print(
            f"   at batch {k:>6,}: new process {med:.2f} s ({med / base[0]:.2f}x), of which prep "
            f"(config, orchestrator, checkpoint load, loader restore, first batch) {wmed * 1000:.0f} ms "
            f"({wmed / base[1]:.2f}x)"
        )


def checkpoint(a: argparse.Namespace, work: Path) -> None:
    c = checkpoint_costs(work, 4 if a.quick else 13, a.quick)
    print(
        f"\n3. checkpoint write, {c['params_M']:.1f}M parameters + AdamW state ({c['size_MB']:.0f} MB), "
        "median:"
    )
    print(
        f"   prep (atomic, fsync) {c['prep_s']:.3f} s; bare torch.save {c['torch_save_s']:.3f} s "
        f"({c['prep_s'] / c['torch_save_s']:.2f}x); torch.save + fsync {c['torch_save_fsync_s']:.3f} s "
        f"({c['prep_s'] / c['torch_save_fsync_s']:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. 3")
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, 1 thread; scratch {work}"
    )

    parts = {"1": overhead, "2": resume, "3": checkpoint}
    for part in a.parts.split(","):
        parts[part.strip()](a, work)


if __name__ == "__main__":
    main()
