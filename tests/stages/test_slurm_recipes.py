"""The Slurm recipes in recipes/slurm: the array scripts' command lines run with the array variables set
(concurrent slices give the bytes of one plain run), and submit.sh chains arrays with afterok."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages import STAGE_ORDER
from prep.stages.base import RunOptions

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "recipes" / "slurm"


def make_raw(root: Path) -> None:
    rng = random.Random(3)
    for t in range(9):
        (root / f"part{t % 3}").mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / f"part{t % 3}/{t:05d}.tar", "w") as tf:
            for i in range(rng.randint(0, 30)):
                for ext in ("jpg", "txt", "json"):
                    data = rng.randbytes(rng.randint(5, 400))
                    info = tarfile.TarInfo(f"{t:02d}{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def write_config(path: Path, raw: Path, out: Path) -> Path:
    path.write_text(f"reorganize_tar:\n  input_dir: {raw}\n  output_dir: {out}\n  tar_chunk_size: 11\n"
                    f"generate_wdinfo:\n  input_dir: {out}\n  tar_chunk_size: 11\n")
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prep" not in p.relative_to(folder).parts}


def test_every_stage_has_an_array_script_running_its_slice():
    for stage in STAGE_ORDER:
        script = SLURM / f"{stage}.sbatch"
        text = script.read_text()
        assert f'run {stage} --config "$PREP_CONFIG"' in text
        assert '--task-index "$TASK_INDEX" --num-tasks "$SLURM_ARRAY_TASK_COUNT"' in text
        assert "TASK_INDEX=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))" in text
        assert "#SBATCH --array=0-" in text and os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH --gres=gpu:1" in (SLURM / "precache_encodings.sbatch").read_text()


def test_array_script_refuses_to_run_outside_an_array(tmp_path):
    env = {**os.environ, "PREP_CONFIG": str(tmp_path / "x.yaml")}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    script = str(SLURM / "reorganize_tar.sbatch")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "SLURM_ARRAY_TASK_ID is unset" in proc.stderr


@pytest.mark.slow
def test_concurrent_array_slices_give_the_bytes_of_one_run(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw)
    ref_out, arr_out = tmp_path / "ref", tmp_path / "arr"
    cfg = load_config(write_config(tmp_path / "ref.yaml", raw, ref_out))
    for stage in ("reorganize_tar", "generate_wdinfo"):
        assert run_stage(stage, cfg, RunOptions(quiet=True)).ok
    config = write_config(tmp_path / "arr.yaml", raw, arr_out)
    env = {**os.environ, "PREP_CONFIG": str(config), "PREP": f"{sys.executable} -m prep.cli",
           "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_CPUS_PER_TASK": "1"}
    for stage, first_id in (("reorganize_tar", 1), ("generate_wdinfo", 0)):  # --array=1-3, then 0-2
        procs = [subprocess.Popen(["bash", str(SLURM / f"{stage}.sbatch")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env, "SLURM_ARRAY_TASK_ID": str(first_id + i),
                                       "SLURM_ARRAY_TASK_MIN": str(first_id)})
                 for i in range(3)]
        for p in procs:
            _, err = p.communicate()
            assert p.returncode == 0, err[-2000:]
    assert tree(arr_out) == tree(ref_out)
    assert {"manifest.json", "wdinfo.pkl", "000000.tar", "000000.tar.idx"} <= set(tree(arr_out))


FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$SBATCH_STATE" 2>/dev/null || echo 1000) + 1 ))
echo "$n" > "$SBATCH_STATE"
echo "$*" >> "$SBATCH_LOG"
echo "$n;cluster"
"""


def submit(tmp_path: Path, *stages: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sbatch").write_text(FAKE_SBATCH)
    (bindir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SBATCH_LOG": str(log),
           "SBATCH_STATE": str(tmp_path / "state"), "PYTHON": sys.executable,
           "PREP_CONFIG": str(ROOT / "configs" / "download_multimodal.yaml"), **env_extra}
    script = str(SLURM / "submit.sh")
    proc = subprocess.run(["bash", script, *stages], env=env, capture_output=True, text=True)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_submit_chains_each_stage_after_the_whole_previous_array(tmp_path):
    proc, calls = submit(tmp_path, ARRAY_REORGANIZE_TAR="64", AFTER="77", SBATCH_ARGS="--partition=cpu")
    assert proc.returncode == 0, proc.stderr
    # the template leaves ingest_local off, and merge_source_tar to follow precache (keep_source: true)
    enabled = [s for s in STAGE_ORDER if s not in ("ingest_local", "merge_source_tar")]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == enabled
    ids = [line.split()[1] for line in proc.stdout.splitlines()]
    assert ids == [str(1001 + i) for i in range(len(enabled))]
    for i, (stage, call) in enumerate(zip(enabled, calls, strict=True)):
        args = call.split()
        assert args[-1] == str(SLURM / f"{stage}.sbatch")
        assert "--parsable" in args and "--partition=cpu" in args
        assert f"--dependency=afterok:{ids[i - 1] if i else 77}" in args
        assert ("--array=0-63" in args) == (stage == "reorganize_tar")


def test_submit_named_stages_and_unknown_stage(tmp_path):
    proc, calls = submit(tmp_path, "reorganize_tar", "merge_source_tar")
    assert proc.returncode == 0 and len(calls) == 2
    assert "--dependency" not in calls[0] and "--dependency=afterok:1001" in calls[1]
    proc, calls = submit(tmp_path, "reorganise_tar")
    assert proc.returncode == 2 and "no Slurm script for stage 'reorganise_tar'" in proc.stderr and not calls
