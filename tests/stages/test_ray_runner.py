"""`--runner ray` on real local Ray (2 CPUs): reorganize_tar then merge_source_tar give the same bytes
as the process-pool runner, a task that fails in a Ray worker is reported, not fatal, and the Ray job
entry point (recipes/ray/ray_job.py) runs stages on it."""

from __future__ import annotations

import importlib.util
import io
import random
import tarfile
from pathlib import Path

import pytest
import ray

from prep.config import load_config
from prep.runtime.ray_runner import RayExecutor
from prep.runtime.runner import make_executor, run_stage
from prep.stages.base import RunOptions


def load_ray_job():
    path = Path(__file__).resolve().parents[2] / "recipes" / "ray" / "ray_job.py"
    spec = importlib.util.spec_from_file_location("prep_ray_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_raw(root: Path) -> None:
    rng = random.Random(7)
    for t in range(8):
        n = rng.randint(0, 40)
        keys = [f"{t:02d}{i:05d}" for i in range(n)]
        rng.shuffle(keys)
        (root / f"p{t % 2}").mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / f"p{t % 2}/{t:05d}.tar", "w") as tf:
            for k in keys:
                for ext, data in (("jpg", rng.randbytes(rng.randint(10, 900))), ("txt", k.encode())):
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def make_precached(reorganized: Path, pre: Path) -> None:
    """What precache writes with keep_source: false: only KEY.<enc>.npy members, same shard names."""
    from prep.formats.tar import scan_tar
    from prep.formats.tar_write import write_shard

    pre.mkdir()
    for shard in sorted(reorganized.glob("*.tar")):
        samples = [(s.key, {"emb.npy": s.key.encode() * 3}) for s in scan_tar(shard).samples]
        write_shard(pre / shard.name, samples)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prep" not in p.parts}


def both_stages(tmp: Path, opts: RunOptions) -> tuple[dict[str, bytes], dict[str, bytes]]:
    raw, out, pre = tmp / "raw", tmp / "reorganized", tmp / "precached"
    make_raw(raw)
    cfg = load_config(None, [f"reorganize_tar.input_dir={raw}", f"reorganize_tar.output_dir={out}",
                             "reorganize_tar.tar_chunk_size=17", f"merge_source_tar.input_dir={pre}",
                             f"merge_source_tar.source_dir={out}"])
    first = run_stage("reorganize_tar", cfg, opts)
    assert first.ok and first.finalized and len(first.results) > 4, first.to_json()
    make_precached(out, pre)
    second = run_stage("merge_source_tar", cfg, opts)
    assert second.ok and second.finalized, second.to_json()
    assert second.counts()["members_appended"] == 2 * first.counts()["samples_out"]
    return outputs(out), outputs(pre)


@pytest.mark.slow
def test_ray_local_mode_matches_process_pool_byte_for_byte(tmp_path):
    pool = both_stages(tmp_path / "pool", RunOptions(workers=2, quiet=True))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        opts = RunOptions(runner="ray", quiet=True)
        executor = make_executor(opts, 10)
        assert isinstance(executor, RayExecutor)
        executor.shutdown()
        assert ray.is_initialized()  # a Ray the caller started is left running
        with_ray = both_stages(tmp_path / "ray", opts)

        def boom(task):
            raise OSError(f"disk gone while running {task.id}")

        from prep.stages.base import Task

        executor = RayExecutor(opts)
        results = [executor.submit(boom, Task(f"t{i}", {})).result() for i in range(2)]
        assert [(r.task_id, r.status) for r in results] == [("t0", "failed"), ("t1", "failed")]
        assert "disk gone while running t0" in results[0].error

        job = load_ray_job()  # the cluster entry point, on the Ray started above
        cfg = tmp_path / "job.yaml"
        cfg.write_text(f"reorganize_tar:\n  input_dir: {tmp_path / 'pool' / 'raw'}\n"
                       f"  output_dir: {tmp_path / 'job'}\n  tar_chunk_size: 17\n")
        assert job.main(["--config", str(cfg), "reorganize_tar", "--json"]) == 0
        assert ray.is_initialized()
        assert outputs(tmp_path / "job") == pool[0]
        assert job.main(["--config", str(cfg), "reorganise_tar"]) == 1
    finally:
        ray.shutdown()
    assert with_ray == pool
    assert any(name.endswith(".tar.idx") for name in pool[0]) and "manifest.json" in pool[1]
