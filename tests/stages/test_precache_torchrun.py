"""precache_encodings under `torchrun --nproc_per_node 2` (CPU): every shard is encoded exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard
from prep.testing.tiny_models import write_clip_tokenizer, write_tiny_clip_text

STAGE = "precache_encodings"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_ranks_cover_every_shard_exactly_once(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_clip_tokenizer(models / "tokenizer")
    write_tiny_clip_text(models / "text_encoder", models / "tokenizer")
    n_shards = 5
    for s in range(n_shards):
        write_shard(
            tmp_path / "in" / f"{s:05d}.tar",
            [(f"{s:03d}{i:05d}", {"txt": f"the cat {s} {i}".encode()}) for i in range(3)],
        )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        textwrap.dedent(f"""
        precache_encodings:
          input_dir: {tmp_path / "in"}
          output_dir: {tmp_path / "out"}
          num_workers: 0
          encoders:
            - {{key: clip, modality: text, model: "transformers:CLIPTextModel", pretrained: "{models}",
                subfolder: text_encoder, max_length: 8}}
    """)
    )
    logs = tmp_path / "logs"
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "1",
        "-m",
        "prep.cli",
        "run",
        STAGE,
        "--config",
        str(cfg),
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {}
    for out in logs.rglob("stdout.log"):
        rank = int(out.parent.name)
        docs[rank] = json.loads(out.read_text())
    assert set(docs) == {0, 1}
    counts = {rank: d["done"] for rank, d in docs.items()}
    assert sum(counts.values()) == n_shards and all(c > 0 for c in counts.values())
    markers = sorted((tmp_path / "out" / ".prep" / "done" / STAGE).glob("*.tar.json"))
    assert len(markers) == n_shards
    ranks = {}
    for m in markers:
        result = json.loads(m.read_text())["result"]
        ranks[result["task_id"]] = result["data"]["rank"]
    assert sorted(ranks) == [f"{s:05d}.tar" for s in range(n_shards)]
    assert set(ranks.values()) == {0, 1}
    assert all(ranks[f"{s:05d}.tar"] == s % 2 for s in range(n_shards))  # rank r takes every 2nd task from r
    for s in range(n_shards):
        scan = scan_tar(tmp_path / "out" / f"{s:05d}.tar")
        assert [sorted(x.members) for x in scan.samples] == [["clip.npy", "clip_mask.npy", "txt"]] * 3
    # the last rank to finish wrote the manifest, covering both ranks' shards
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 3 * n_shards
    assert sum(1 for d in docs.values() if d["finalized"]) >= 1
