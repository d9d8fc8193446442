"""The Python snippets of the README and the loader pages run as written and give what their text says.

Each fenced ```python block of the pages below is extracted and run against real generated shards (the
docs' `/data/...` folders point at them, `num_workers=8` becomes 1, an `hf://` repo is a loopback hub);
names a snippet leaves to the reader (`train_step`, `model`, `build_loader`, ...) come from a prelude,
and a check after it asserts what the page says it does. A new block must be registered here: run, or
skipped with the reason and the test that covers it instead.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prep.formats.checksum import file_checksum
from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.formats.tar_write import write_shard
from prep.testing.loader_data import make_shards
from prep.testing.servers import serve_hub

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/loaders.md", "docs/latents.md", "docs/resume.md", "docs/pipeline.md"]

SKIPPED = {  # (page, block index): why it is not run here
    ("docs/pipeline.md", 1): "needs your modules and trainers; tests/pipeline runs the orchestrator",
    ("docs/pipeline.md", 2): "Lightning's loop: tests/pipeline/test_own_loops.py runs it",
    ("docs/pipeline.md", 3): "accelerate's loop: tests/pipeline/test_own_loops.py runs it",
}


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), re.M | re.S)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("snippets")
    make_shards(root / "laion", [40, 30], image_size=16)
    make_shards(root / "art", [20], image_size=16, prefix="art")
    merged = root / "merged"  # precached: vae.npy moments + clip.npy, the factors in the manifest
    merged.mkdir()
    rng = np.random.default_rng(0)
    samples = [(f"m{i:03d}", {"vae.npy": _npy(rng.normal(size=(8, 4, 4)).astype(np.float32)),
                              "clip.npy": _npy(rng.normal(size=(5, 6)).astype(np.float32)), "txt": b"a cat"})
               for i in range(128)]  # two whole batches of 64
    tar = merged / "000000.tar"
    write_shard(tar, samples, fsync=False)
    entry = ShardEntry(tar.name, 128, tar.stat().st_size, file_checksum(tar))
    encoders = {"vae": {"scaling_factor": 0.13025, "shift_factor": 0.0,
                        "settings": {"latent_mode": "moments"}}}
    fields = {"vae.npy": {"dtype": "float32", "shape": [8, 4, 4]},
              "clip.npy": {"dtype": "float32", "shape": [5, 6]}}
    write_manifest(merged, Manifest([entry], fields, encoders))
    return {"laion": root / "laion", "art": root / "art", "merged": merged}


def _adapt(code: str, data: dict[str, Path]) -> str:
    for doc, real in [("/data/laion/tarfiles_reorganized", data["laion"]),
                      ("/data/laion/tarfiles_merged", data["merged"]),
                      ("/data/art/tarfiles_reorganized", data["art"]),
                      ("/data/laion", data["laion"]), ("/data/art", data["art"])]:
        code = code.replace(f'"{doc}"', repr(str(real)))
    code = code.replace('"/local/nvme/prep-cache"', '"prep-cache"')  # in the test's working folder
    return code.replace("num_workers=8", "num_workers=1")


def _readme(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    seen: list[dict[str, Any]] = []
    ns["train_step"] = seen.append
    ns["save"] = lambda ckpt: seen.append({"saved": json.dumps(ckpt["loader"])})
    yield
    batches = [b for b in seen if "saved" not in b]
    assert len(batches) == len(ns["loader"]) == 3 + 1  # an epoch: both sources' batches (70 + 20)
    assert all({"jpg", "txt", "__key__"} <= set(b) for b in batches)
    assert any("saved" in b for b in seen)  # the state is JSON


def _blend_state(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    yield
    assert [b["__key__"] for b in ns["loader2"]] == [b["__key__"] for b in ns["loader"]]


def _hub_cache(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    files = {p.name: p.read_bytes() for p in data["laion"].iterdir() if p.is_file()}
    token = "hf_docs-snippet-token"
    with serve_hub("me/shards", {"main": files}, token=token) as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        from prep.loaders import ShardDataset

        ns.update(TOKEN=token, ShardDataset=ShardDataset)
        yield
        from prep.loaders import DataLoader

        batch = next(iter(DataLoader(ns["ds"])))
        assert len(batch["__key__"]) == 32
    assert any(p.name.endswith(".shard") for p in Path("prep-cache").rglob("*"))  # read whole, into the cache


def _weights(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    import itertools

    from prep.loaders import DataLoader, MixBatchDataset, SequenceDataset, Source

    def rows(n: int, seed: int) -> SequenceDataset:
        g = torch.Generator().manual_seed(seed)
        return SequenceDataset([{"x": torch.randn(4, generator=g), "y": torch.randn((), generator=g)}
                                for _ in range(n)], batch_size=1, shuffle=True, seed=seed)

    ns.update(MixBatchDataset=MixBatchDataset, Source=Source, web=rows(48, 1), curated=rows(16, 2),
              model=lambda x: x.sum(1), loss_fn=torch.nn.functional.mse_loss,
              DataLoader=lambda ds: itertools.islice(DataLoader(ds), 3))  # the mix repeats: 3 batches
    yield
    w = ns["batch"]["__weight__"]
    assert w.dtype == torch.float32 and sorted(set(w.tolist())) == [1.0, 2.0] and int((w == 2).sum()) == 4
    assert torch.isfinite(ns["loss"]) and ns["loss"].ndim == 0


def _latents(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    yield
    z = ns["z"]
    assert z.shape == (64, 4, 4, 4) and z.dtype == torch.float32  # [64, C, H, W]: C of the 2C moments
    assert "vae.npy" not in ns["batch"] and "clip.npy" in ns["batch"]


def _resume(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    from prep.loaders import DataLoader, ShardDataset

    def build_loader() -> DataLoader:
        return DataLoader(ShardDataset(data["laion"], batch_size=8, seed=3), num_workers=1)

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    loader = build_loader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    ns.update(torch=torch, model=model, opt=opt, loader=loader, step=3, build_loader=build_loader)
    yield
    assert next(iter(ns["loader"]))["__key__"] == next(it)["__key__"]  # the exact next batch


def _parse(ns: dict[str, Any], data: dict[str, Path]) -> Iterator[None]:
    from prep.pipeline import PipelineConfig, example_yaml

    Path("train.yaml").write_text(example_yaml())  # `prep pipeline example train.yaml`
    yield
    assert isinstance(ns["cfg"], PipelineConfig)


RUN = {
    ("README.md", 0): _readme,
    ("docs/loaders.md", 0): _blend_state,
    ("docs/loaders.md", 1): _hub_cache,
    ("docs/loaders.md", 2): _weights,
    ("docs/latents.md", 0): _latents,
    ("docs/resume.md", 0): _resume,
    ("docs/pipeline.md", 0): _parse,
}


def test_every_python_block_is_run_or_skipped_with_a_reason() -> None:
    blocks = {(page, i) for page in PAGES for i in range(len(python_blocks(page)))}
    assert blocks == set(RUN) | set(SKIPPED), ("register:", blocks - set(RUN) - set(SKIPPED),
                                               "gone:", set(RUN) | set(SKIPPED) - blocks)
    assert not set(RUN) & set(SKIPPED)


@pytest.mark.parametrize("page,index", sorted(RUN), ids=[f"{p}#{i}" for p, i in sorted(RUN)])
def test_python_block_runs_as_the_page_says(page, index, data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = _adapt(python_blocks(page)[index], data)
    ns: dict[str, Any] = {"__name__": "snippet"}
    steps = RUN[(page, index)](ns, data)
    next(steps)
    exec(compile(code, f"{page} python block {index}", "exec"), ns)
    with pytest.raises(StopIteration):
        next(steps)
