"""Plain `webdataset`: it reads prep shards (and a folder through NeMo's wdinfo.pkl) with every sample
once and the same bytes; prep's scanner reads webdataset's own TarWriter output as webdataset does."""

from __future__ import annotations

import io
from pathlib import Path

import webdataset as wds
from rich.console import Console

from prep.config import load_config
from prep.formats.index import read_index
from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard
from prep.formats.wdinfo import read_wdinfo
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions


def jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (i * 40 % 256, 0, 200)).save(buf, "JPEG")
    return buf.getvalue()


def folder_of_shards(folder: Path, counts: list[int]) -> dict[str, dict[str, bytes]]:
    everything = {}
    for s, n in enumerate(counts):
        samples = {
            f"dir{s}/k{s}_{i:04d}": {
                "jpg": jpeg(i),
                "txt": f"cap {s} {i}".encode(),
                "json": f'{{"i": {i}}}'.encode(),
            }
            for i in range(n)
        }
        write_shard(folder / f"shard-{s:03d}.tar", samples.items(), fsync=False)
        everything.update(samples)
    return everything


def test_webdataset_reads_prep_shards(tmp_path: Path) -> None:
    everything = folder_of_shards(tmp_path, [3, 3, 2])
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    got = {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    }
    assert got == everything
    decoded = next(
        iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    )
    assert decoded[0].size == (8, 6) and decoded[1] == "cap 0 0" and decoded[2] == {"i": 0}


def test_nemo_style_read_through_wdinfo(tmp_path: Path) -> None:
    everything = folder_of_shards(tmp_path, [4, 4, 1])
    cfg = load_config(None, [f"generate_wdinfo.input_dir={tmp_path}", "generate_wdinfo.tar_chunk_size=4"])
    assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True), Console(quiet=True)).ok
    info = read_wdinfo(tmp_path / "wdinfo.pkl")
    urls = [str(tmp_path / t) for t in info["tar_files"]]  # NeMo joins tar_files with the dataset root
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert len(keys) == len(set(keys)) == info["total_key_count"] == 9
    assert set(keys) == set(everything)


def test_prep_reads_webdataset_tarwriter_output(tmp_path: Path) -> None:
    path = tmp_path / "w.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"sample{i:03d}", "png": b"p" * (i * 100 + 1), "cls": str(i).encode()})
    scan = scan_tar(path)
    theirs = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert [s.key for s in scan.samples] == theirs
    assert all(set(s.members) == {"png", "cls"} for s in scan.samples)
    cfg = load_config(None, [f"generate_wdinfo.input_dir={tmp_path}"])
    assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True), Console(quiet=True)).ok
    assert read_index(path).tolist() == [s.offset for s in scan.samples] + [scan.end]
