"""kill -9 at many moments of a real `prep pipeline run` (mid-epoch, around validation, while a
checkpoint is being written, at a step boundary, just after an early transition), resuming each time:
the final weights are bitwise those of an uninterrupted run, and so is the stream of batch keys."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prep.pipeline import checkpoint as ckpt
from prep.testing.loader_data import make_shards
from prep.testing.pipeline_data import pipeline_run_args

CONFIG = """\
training:
  pipeline:
    datasets:
      d: {type: prep, path: DATA/d, decode: raw, batch_size: 4}
      v: {type: prep, path: DATA/v, decode: raw, shuffle: false}
    default_dataset: d
    defaults: {workers: 0, seed: 3}
    steps:
      - name: decoder
        n_epochs: 3
        train: [reg]
        freeze: [enc]
        optimization:
          optimizers: {dec: {type: AdamW, lr: 0.01}}
          schedulers: {dec: {type: CosineAnnealingLR, T_max: auto}}
        validation: {dataset: v, every: 5ba}
        checkpoint_every: 1ba
      - name: early
        max_steps: 40
        train: [reg]
        optimization: {optimizers: {dec: {type: SGD, lr: 0.01, momentum: 0.9}}}
        transition_on: {mode: loss_threshold, metric: loss, threshold: 100.0, patience: 2, check_every: 3ba}
        checkpoint_every: 2ba
      - name: both
        max_steps: 20
        train: [reg]
        unfreeze: [enc]
        optimization: {optimizers: {all: {type: AdamW, lr: 0.005, params: [enc, dec]}}}
        validation: {dataset: v, every: 4ba}
        ema: {decay: 0.9}
        checkpoint_every: 1ba
"""
SRC = Path(__file__).resolve().parents[2] / "src"


def _start(config: Path, folder: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PREP_TEST_KEY_LOG": str(log),
    }
    cmd = [sys.executable, "-m", "prep.cli", *pipeline_run_args(config, folder)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _seen(log: Path) -> int:
    """The highest global batch the run has trained (from the trainer's key log), -1 before any."""
    path = Path(f"{log}.rank0")
    if not path.exists():
        return -1
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
    return max((json.loads(ln)["batch"] for ln in lines), default=-1)


def _final(folder: Path) -> dict:
    [path] = folder.glob("step-002-*.pt")
    return ckpt.load(path)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_is_bitwise(tmp_path):
    make_shards(tmp_path / "data" / "d", [30, 25, 27], image_size=8, distinct_images=1)  # 21 batches/epoch
    make_shards(tmp_path / "data" / "v", [6], image_size=8, distinct_images=1, prefix="val")
    config = tmp_path / "train.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))

    ref = _start(config, tmp_path / "ref", tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]

    rng = random.Random(11)
    # (what, global batch): kill once the run has trained past that batch; "tmp": while a checkpoint
    # is being written. 62/63: the last batches of step 1 (its step-end checkpoint); 68-70: just after
    # step 2's early transition (threshold met at its 6th batch); the others: mid-epoch, near validation
    plan = [
        ("batch", rng.randint(2, 8)),
        ("tmp", None),
        ("batch", rng.randint(20, 30)),
        ("batch", 62),
        ("batch", rng.randint(68, 70)),
        ("tmp", None),
        ("batch", rng.randint(75, 80)),
        ("batch", 86),
    ]
    folder, log = tmp_path / "killed", tmp_path / "killed.log"
    kills = 0
    for what, at in plan:
        proc = _start(config, folder, log)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            hit = (what == "batch" and _seen(log) >= at) or (
                what == "tmp" and _seen(log) >= 0 and any(folder.glob(".*.tmp"))
            )
            if hit:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.001)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert kills >= 5
    last = _start(config, folder, log)
    assert last.wait(timeout=300) == 0, last.stderr.read().decode()[-3000:]

    want, got = _final(tmp_path / "ref"), _final(folder)
    for name, state in want["modules"].items():
        for key, value in state.items():
            assert torch.equal(got["modules"][name][key], value), f"{name}.{key} differs"
    assert got["trainers"]["reg"]["keys"] == want["trainers"]["reg"]["keys"]
    assert len(want["trainers"]["reg"]["keys"]) == 63 + 6 + 20
    meta = json.loads(got["meta"])
    assert [s["reason"].split(":")[0] for s in meta["state"]["completed"]] == [
        "epoch",
        "loss_threshold",
        "length",
    ]
    assert not list(folder.glob(".*.tmp"))
