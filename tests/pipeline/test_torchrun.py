"""A pipeline under a real torchrun (gloo, CPU): saved mid-step on 2 ranks, then resumed on 2 ranks and
on 1 rank (with the same global batch): the global sample stream is the uninterrupted one. Saved on 1
rank and resumed on 3: the ranks the checkpoint has no RNG state for get streams of their own."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prep.testing.loader_data import make_shards
from prep.testing.pipeline_data import pipeline_run_args

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = """\
datasets:
  d: {type: prep, path: DATA, decode: raw, seed: 5}
default_dataset: d
defaults: {workers: 0, seed: 1}
steps:
  - name: only
    max_steps: 8
    train: [reg]
    optimization: {optimizers: {all: {type: SGD, lr: 0.05, params: [enc, dec]}}}
    checkpoint_every: 1ba
"""


def _run(nproc: int, config: Path, folder: Path, log: Path, batch: int, *extra: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PREP_TEST_KEY_LOG": str(log),
    }
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    cmd = [
        *head,
        "prep.cli",
        *pipeline_run_args(config, folder, "--set", f"steps.0.batch_size={batch}", *extra),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _stream(log: Path, world: int) -> dict[int, list[str]]:
    """Global batch number -> its keys, rank slices joined in rank order."""
    per_rank = [
        [json.loads(ln) for ln in Path(f"{log}.rank{r}").read_text().splitlines()] for r in range(world)
    ]
    out: dict[int, list[str]] = {}
    for docs in per_rank:
        for d in docs:
            out.setdefault(d["batch"], []).extend(d["keys"])
    return out


@pytest.mark.slow
def test_two_ranks_saved_then_resumed_on_two_and_on_one(tmp_path):
    make_shards(tmp_path / "data", [9, 6, 8, 7, 5], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))

    _run(1, config, tmp_path / "ref", tmp_path / "ref.log", 4)
    want = _stream(tmp_path / "ref.log", 1)
    assert sorted(want) == list(range(8)) and all(len(k) == 4 for k in want.values())

    _run(2, config, tmp_path / "first", tmp_path / "first.log", 2, "--stop-after", "3")
    first = _stream(tmp_path / "first.log", 2)
    assert first == {b: want[b] for b in range(3)}
    shutil.copytree(tmp_path / "first", tmp_path / "on1")

    _run(2, config, tmp_path / "first", tmp_path / "on2.log", 2)
    assert _stream(tmp_path / "on2.log", 2) == {b: want[b] for b in range(3, 8)}

    _run(1, config, tmp_path / "on1", tmp_path / "on1.log", 4)  # 1 rank, same global batch of 4
    assert _stream(tmp_path / "on1.log", 1) == {b: want[b] for b in range(3, 8)}


def _draws(log: Path, rank: int) -> dict[int, list[float]]:
    """Global batch -> the (python, numpy, torch) numbers the rank drew at it."""
    docs = [json.loads(ln) for ln in Path(f"{log}.rank{rank}").read_text().splitlines()]
    return {d["batch"]: d["draws"] for d in docs}


@pytest.mark.slow
def test_ranks_added_on_resume_draw_streams_of_their_own(tmp_path):
    """Saved on 1 rank, resumed on 3 (the same global batch of 3), twice from the same checkpoint: ranks 1
    and 2, which it has no RNG state for, draw python, numpy and torch numbers that no other rank draws
    (they were rank 0's copies), the same in both resumes; rank 0 continues its saved streams, and a
    resume on 1 rank draws exactly what the uninterrupted run drew."""
    make_shards(tmp_path / "data", [9, 6, 8, 7, 5], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    _run(1, config, tmp_path / "ref", tmp_path / "ref.log", 3)
    want = _draws(tmp_path / "ref.log", 0)
    _run(1, config, tmp_path / "first", tmp_path / "first.log", 3, "--stop-after", "2")
    for copy in ("same", "a", "b"):
        shutil.copytree(tmp_path / "first", tmp_path / copy)

    _run(1, config, tmp_path / "same", tmp_path / "same.log", 3)
    assert _draws(tmp_path / "same.log", 0) == {b: want[b] for b in range(2, 8)}  # bitwise

    _run(3, config, tmp_path / "a", tmp_path / "a.log", 1)
    _run(3, config, tmp_path / "b", tmp_path / "b.log", 1)
    a = [_draws(tmp_path / "a.log", r) for r in range(3)]
    assert a == [_draws(tmp_path / "b.log", r) for r in range(3)]  # the same in every such resume
    assert all(sorted(d) == list(range(2, 8)) for d in a)
    # rank 0 restored its own state: one python and one numpy number per batch, as in the reference
    assert {b: d[:2] for b, d in a[0].items()} == {b: want[b][:2] for b in range(2, 8)}
    for lib in range(3):  # python, numpy, torch: no number of a new rank is any other rank's
        drawn = [{d[lib] for d in a[r].values()} for r in range(3)]
        assert all(len(x) == 6 for x in drawn), lib
        assert not (drawn[1] & drawn[0]) and not (drawn[2] & drawn[0]) and not (drawn[1] & drawn[2]), lib
