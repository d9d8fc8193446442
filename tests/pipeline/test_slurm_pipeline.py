"""recipes/slurm/pipeline_run.sbatch: its srun + torchrun command line, run with stand-ins for srun and
scontrol (a real torchrun, 2 CPU ranks on this node), trains the pipeline and leaves its checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prep.testing.loader_data import make_shards
from prep.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "slurm" / "pipeline_run.sbatch"
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's own options
exec "$@"
"""


def test_script_is_valid_bash_and_refuses_without_its_variables():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE", "ENTRY")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set PIPELINE" in proc.stderr


@pytest.mark.slow
def test_sbatch_command_line_runs_two_ranks(tmp_path):
    make_shards(tmp_path / "data", [9, 7], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(
        f"datasets:\n  d: {{type: prep, path: {tmp_path / 'data'}, decode: raw, batch_size: 2}}\n"
        "default_dataset: d\ndefaults: {workers: 0}\nsteps:\n"
        "  - {name: s, max_steps: 3, train: [reg], optimization: {optimizers: "
        "{all: {type: SGD, lr: 0.1, params: [enc, dec]}}}}\n"
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (
        ("srun", SRUN),
        ("scontrol", "#!/bin/bash\necho 127.0.0.1\n"),
        ("torchrun", f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n'),
    ):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "PIPELINE": str(config),
        "ENTRY": "prep.testing.pipeline_data:build",
        "CKPT_DIR": str(tmp_path / "ck"),
        "GPUS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "42",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "ck").glob("step-*.pt")] == ["step-000-000000000003-s.pt"]
