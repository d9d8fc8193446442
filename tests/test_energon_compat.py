"""megatron-energon itself: the `.idx` it writes for tarfile-made tars equals ours, its shard counts
equal ours, and a folder that generate_wdinfo described loads in energon (captioning samples through
get_train_dataset/get_val_dataset, crude samples through a cooker) with every sample exactly once."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from prep.config import load_config
from prep.formats.index import read_index
from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

pytestmark = pytest.mark.slow  # energon's import alone takes a few seconds

QUIET = Console(quiet=True)


def generate_wdinfo(folder: Path, *extra: str) -> None:
    cfg = load_config(None, [f"generate_wdinfo.input_dir={folder}", *extra])
    result = run_stage("generate_wdinfo", cfg, RunOptions(quiet=True), QUIET)
    assert result.ok, result.to_json()


def worker_config():
    from megatron.energon import WorkerConfig

    return WorkerConfig(rank=0, world_size=1, num_workers=0)


def add(t: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tricky_tars(folder: Path) -> list[str]:
    """Tars as tarfile writes them: GNU long names, pax headers (long and non-ASCII names), directory
    entries, metadata members, an extension-less member inside a sample, and a trailing skipped member."""
    folder.mkdir()
    long_dir = "p" * 90 + "/" + "q" * 40
    with tarfile.open(folder / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as t:
        add(t, "__meta__/stats.json", b"{}")
        add(t, long_dir, kind=tarfile.DIRTYPE)
        for i in range(5):
            add(t, f"{long_dir}/{i:04d}.jpg", bytes([i]) * (300 + 700 * i))
            if i == 2:
                add(t, "README", b"not a sample member")
            add(t, f"{long_dir}/{i:04d}.txt", f"caption {i}".encode())
        add(t, "__later__/x", b"trailing")
    with tarfile.open(folder / "pax.tar", "w", format=tarfile.PAX_FORMAT) as t:
        for i in range(4):
            key = f"ключ-{i}" + "z" * 100 * (i % 2)
            add(t, f"{key}.jpg", b"j" * (i + 1) * 511)
            add(t, f"{key}.cls", str(i).encode())
    with tarfile.open(folder / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(3):
            add(t, f"a/{i}.json", b"{}" * (i + 200))
    return ["gnu.tar", "pax.tar", "ustar.tar"]


def test_idx_and_counts_equal_what_energon_writes(tmp_path: Path) -> None:
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    names = tricky_tars(tmp_path / "ours")
    shutil.copytree(tmp_path / "ours", tmp_path / "theirs")
    generate_wdinfo(tmp_path / "ours")
    WebdatasetPreparator.prepare_dataset(
        tmp_path / "theirs", names, split_parts_ratio=[("train", 1.0)], workers=1
    )
    for name in names:
        ours, theirs = tmp_path / "ours" / name, tmp_path / "theirs" / name
        assert (tmp_path / "ours" / f"{name}.idx").read_bytes() == (
            tmp_path / "theirs" / f"{name}.idx"
        ).read_bytes()
        with tarfile.open(ours) as t:  # and both equal an independent scan with tarfile
            t.getmembers()
            assert int(read_index(theirs)[-1]) == t.offset == scan_tar(ours).end
    info = lambda d: json.loads((d / ".nv-meta" / ".info.json").read_text())["shard_counts"]  # noqa: E731
    assert (
        info(tmp_path / "ours") == info(tmp_path / "theirs") == {"gnu.tar": 5, "pax.tar": 4, "ustar.tar": 3}
    )


def jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (i * 37 % 256, i * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def captioning_folder(folder: Path, counts: list[int]) -> dict[str, str]:
    captions: dict[str, str] = {}
    for s, n in enumerate(counts):
        samples = []
        for i in range(n):
            key = f"p{s:02d}_{i:05d}"
            captions[key] = f"a photo number {s}.{i}"
            samples.append((key, {"jpg": jpeg(i), "txt": captions[key].encode(), "json": b"{}"}))
        write_shard(folder / f"shard-{s:03d}.tar", samples, fsync=False)
    return captions


def test_generate_wdinfo_output_loads_in_energon(tmp_path: Path) -> None:
    from megatron.energon import CaptioningSample, get_loader, get_train_dataset, get_val_dataset

    captions = captioning_folder(tmp_path, [4, 4, 3])
    generate_wdinfo(tmp_path, "generate_wdinfo.tar_chunk_size=4")
    val = [
        s
        for s in get_loader(
            get_val_dataset(tmp_path, split_part="train", worker_config=worker_config(), batch_size=None)
        )
    ]
    assert sorted(s.__key__ for s in val) == sorted(captions)
    assert all(isinstance(s, CaptioningSample) and s.caption == captions[s.__key__] for s in val)
    assert tuple(val[0].image.shape) == (3, 12, 16)
    train = get_train_dataset(
        tmp_path,
        split_part="train",
        worker_config=worker_config(),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
    )
    it = iter(get_loader(train))
    epoch = [next(it).__key__ for _ in range(len(captions))]
    assert sorted(epoch) == sorted(captions), "one epoch of the (infinite) train loader: each sample once"


def test_crude_dataset_loads_through_a_cooker(tmp_path: Path) -> None:
    import numpy as np
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        TextSample,
        basic_sample_keys,
        get_loader,
        get_val_dataset,
        stateless,
    )

    expected = {}
    for s in range(2):
        samples = []
        for i in range(3):
            buf = io.BytesIO()
            np.save(buf, np.full((2, 3), s * 10 + i, dtype=np.float16))
            samples.append((f"c{s}_{i}", {"vae.npy": buf.getvalue(), "txt": f"t{s}{i}".encode()}))
            expected[f"c{s}_{i}"] = (f"t{s}{i}", s * 10 + i)
        write_shard(tmp_path / f"shard-{s}.tar", samples, fsync=False)
    generate_wdinfo(tmp_path)
    seen = {}

    @stateless
    def cook(raw: dict) -> TextSample:
        seen[raw["__key__"]] = float(raw["vae.npy"][0, 0])
        return TextSample(**basic_sample_keys(raw), text=raw["txt"])

    class Encoder(DefaultTaskEncoder):
        cookers = (Cooker(cook),)

    ds = get_val_dataset(
        tmp_path, split_part="train", worker_config=worker_config(), batch_size=None, task_encoder=Encoder()
    )
    got = {s.__key__: s.text for s in get_loader(ds)}
    assert got == {k: t for k, (t, _) in expected.items()}
    assert seen == {k: v for k, (_, v) in expected.items()}
