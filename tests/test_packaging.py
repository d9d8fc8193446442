"""The core install (`pip install prep`, no extras) is enough to load shards, blend and resume, and a
command that needs an extra says which one.

A fresh venv gets prep's wheel (built here, installed without dependencies) and exactly the
distributions its core requirements pull in (their closure, read from the installed packages'
metadata, linked into the venv): no pyarrow, img2dataset, diffusers or ray. Nothing is
downloaded, so the test runs offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pyarrow", "img2dataset", "diffusers", "transformers", "ray", "huggingface_hub")


def core_requirements() -> list[Requirement]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in doc["project"]["dependencies"]]


def closure(reqs: list[Requirement]) -> list[metadata.Distribution]:
    """Every installed distribution the requirements need (markers evaluated without extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(seen.values())


def link_closure(dists: list[metadata.Distribution], site: Path) -> None:
    """Link each distribution's top-level files (packages, modules, .dist-info) into `site`."""
    for dist in dists:
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    from prep.loaders import BlendDataset, DataLoader, ShardDataset
    from prep.testing.loader_data import make_shards

    missing = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None]
    assert not missing, f"core venv has {missing}"
    out = Path(sys.argv[1])
    make_shards(out / "a", [12, 12], prefix="a")
    make_shards(out / "b", [12, 12], prefix="b")

    def loader():
        a = ShardDataset(out / "a", batch_size=4, seed=0, decode="raw")
        b = ShardDataset(out / "b", batch_size=4, seed=1, decode="raw")
        return DataLoader(BlendDataset((a, 0.7), (b, 0.3), seed=3), num_workers=0)

    whole = [list(batch["__key__"]) for _, batch in zip(range(10), loader())]
    first = loader()
    it = iter(first)
    head = [list(next(it)["__key__"]) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [list(batch["__key__"]) for _, batch in zip(range(6), resumed)]
    assert head + tail == whole, "resume in the core venv did not continue on the next batch"
    print("core ok", len(whole))
    """
)


@pytest.mark.slow
def test_core_install_loads_blends_and_resumes_and_names_missing_extras(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    link_closure(closure(core_requirements()), site)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True,
                   capture_output=True, env=env)
    py = venv / "bin" / "python"
    subprocess.run([*pip, "--python", py, "install", "--no-deps", "--no-index", *wheels.glob("prep-*.whl")],
                   check=True, capture_output=True, env=env)

    run = subprocess.run([py, "-c", SCRIPT, str(tmp_path / "data"), ",".join(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "core ok 10" in run.stdout

    version = subprocess.run([py, "-m", "prep.cli", "--version"], env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("prep "), version.stderr

    table = tmp_path / "rows.parquet"
    table.write_bytes(b"PAR1")
    stage = subprocess.run([py, "-m", "prep.cli", "run", "download_parquet",
                            "--set", f"download_parquet.source_path={table}",
                            "--set", f"dataset_output_root={tmp_path / 'out'}"],
                           env=env, capture_output=True, text=True)
    assert stage.returncode != 0
    lines = [ln for ln in stage.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stage.stderr
    assert "prep[stages]" in lines[0] and "Traceback" not in stage.stderr
