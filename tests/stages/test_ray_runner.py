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


@pytest.mark.slow
def test_a_gpu_stage_gives_each_task_a_gpu_on_ray_and_numbers_the_pools_workers(monkeypatch):
    """Ray assigns a GPU only to a task that asks for one (the others of a node all took cuda:0): a
    stage that wants GPUs gets one per task where the cluster has any (Ray's GPU resources, declared
    here on a CPU machine: CUDA_VISIBLE_DEVICES is the task's one GPU), and still runs where it has none.
    The local pool numbers its workers, and worker i takes GPU i modulo the GPUs."""
    import os

    from prep.stages.base import POOL_WORKER_ENV, local_gpu_index
    from prep.stages.precache_encodings import gpus_per_task

    def visible(task):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), [str(i) for i in ray.get_gpu_ids()]

    from prep.stages.base import Task

    opts = RunOptions(runner="ray", quiet=True)
    for gpus_on_cluster, wanted in ((2, 1.0), (2, 0.0), (0, 1.0)):
        ray.init(num_cpus=2, num_gpus=gpus_on_cluster, include_dashboard=False)
        try:
            ex = RayExecutor(opts, wanted)
            seen = [f.result() for f in [ex.submit(visible, Task(f"t{i}", {})) for i in range(4)]]
        finally:
            ray.shutdown()
        if gpus_on_cluster and wanted:
            assert all(len(ids) == 1 and env == ids[0] and ids[0] in ("0", "1") for env, ids in seen), seen
        else:  # none asked for, or none there: the task runs, and sees no GPU of Ray's
            assert all(ids == [] for _, ids in seen), seen
    cfg = load_config(None, ["precache_encodings.device=cpu"])
    assert gpus_per_task(cfg) == 0 and gpus_per_task(load_config(None, [])) == 1  # auto wants one

    ex = make_executor(RunOptions(workers=2), 8)
    try:
        numbers = [f.result() for f in [ex.submit(os.getenv, POOL_WORKER_ENV) for _ in range(8)]]
    finally:
        ex.shutdown()
    assert numbers and all(n in ("0", "1") for n in numbers), numbers
    for env, count, want in (({"LOCAL_RANK": "3", POOL_WORKER_ENV: "5"}, 8, 3),
                             ({POOL_WORKER_ENV: "5"}, 4, 1), ({POOL_WORKER_ENV: "5"}, 0, 0), ({}, 8, 0)):
        for k in ("LOCAL_RANK", POOL_WORKER_ENV):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert local_gpu_index(count) == want, env
