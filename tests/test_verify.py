"""`prep verify`: a good folder passes; one flipped byte, a stale index, a missing or extra shard fail,
naming the shard (library and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prep.cli import app
from prep.config import load_config
from prep.errors import PrepError
from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions
from prep.verify import verify_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for s in range(3):
        write_shard(
            tmp_path / f"shard-{s}.tar",
            [(f"{s}_{i}", {"jpg": bytes([i]) * 900, "txt": b"cap"}) for i in range(4)],
            fsync=False,
        )
    cfg = load_config(None, [f"generate_wdinfo.input_dir={tmp_path}"])
    assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True), Console(quiet=True)).ok
    return tmp_path


def problems(folder: Path) -> dict[str, list[str]]:
    return {Path(c.path).name: c.problems for c in verify_folder(folder) if c.problems}


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_good_folder_passes(folder: Path) -> None:
    assert problems(folder) == {}
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0 and "verified 3 shards" in result.output and "all good" in result.output


def test_one_flipped_data_byte_is_caught_and_named(folder: Path) -> None:
    member = scan_tar(folder / "shard-1.tar").samples[2].members["jpg"]
    flip(folder / "shard-1.tar", member.data_offset + 100)
    (msg,) = problems(folder)["shard-1.tar"]
    assert msg.startswith("xxh3_128 checksum differs from the manifest (the shard's bytes changed) — fix: "
                          "re-create the shard") and f"generate_wdinfo.input_dir={folder}" in msg
    assert set(problems(folder)) == {"shard-1.tar"}
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1
    assert f"bad shard: {folder / 'shard-1.tar'}: xxh3_128 checksum differs" in result.output
    assert "1 bad" in result.output


def test_flipped_header_byte_names_offset(folder: Path) -> None:
    flip(folder / "shard-2.tar", scan_tar(folder / "shard-2.tar").samples[1].offset + 3)
    (msg,) = problems(folder)["shard-2.tar"]
    assert "corrupt tar header at byte" in msg


def test_stale_index_missing_index_and_truncation(folder: Path) -> None:
    (folder / "shard-0.tar.idx").write_bytes((folder / "shard-1.tar.idx").read_bytes()[:-8] + b"\xff" * 8)
    (folder / "shard-1.tar.idx").unlink()
    data = (folder / "shard-2.tar").read_bytes()
    (folder / "shard-2.tar").write_bytes(data[: len(data) - 10240])  # lost its last record
    found = problems(folder)
    assert found["shard-0.tar"][0].startswith(".idx offset 4 is ")
    relist = f"prep run generate_wdinfo --set generate_wdinfo.input_dir={folder}"
    assert found["shard-1.tar"] == [f".idx is missing — fix: write the indexes anew: {relist}"]
    assert " — fix: write the indexes anew" in found["shard-0.tar"][0]
    assert any("bytes" in p for p in found["shard-2.tar"])


def test_missing_and_unlisted_shards(folder: Path) -> None:
    (folder / "shard-0.tar").unlink()
    write_shard(folder / "extra.tar", [("x", {"txt": b"1"})], fsync=False)
    found = problems(folder)
    assert [p.split(" — fix: ")[0] for p in found["shard-0.tar"]] == ["listed in the manifest but missing"]
    assert [p.split(" — fix: ")[0] for p in found["extra.tar"]] == [".idx is missing",
                                                                    "not listed in manifest.json"]
    assert all(" — fix: " in p for ps in found.values() for p in ps)


def test_json_output_and_folder_errors(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    flip(folder / "shard-0.tar", scan_tar(folder / "shard-0.tar").samples[0].members["txt"].data_offset)
    result = CliRunner().invoke(app, ["verify", str(folder), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["shards"] == 3 and list(doc["bad"]) == [str(folder / "shard-0.tar")]
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(PrepError, match=r"no \.tar shards"):
        verify_folder(empty)
    result = CliRunner().invoke(app, ["verify", str(empty / "nope")])
    assert (
        result.exit_code == 1 and result.output.count("\n") == 1 and "folder does not exist" in result.output
    )


def test_without_manifest_checks_indexes_only(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    assert problems(folder) == {}
    (folder / "shard-1.tar.idx").unlink()
    fix = f"prep run generate_wdinfo --set generate_wdinfo.input_dir={folder}"
    assert problems(folder) == {"shard-1.tar": [f".idx is missing — fix: write the indexes anew: {fix}"]}


def test_stale_loader_metadata_is_caught(folder: Path) -> None:
    write_shard(folder / "shard-2.tar", [("2_0", {"jpg": b"1", "txt": b"c"})], fsync=False)  # now 1 sample
    (folder / "manifest.json").unlink()
    (folder / "shard-2.tar.idx").unlink()
    cfg = load_config(None, [f"generate_wdinfo.input_dir={folder}"])  # re-index only: metadata stays old
    from prep.formats.index import write_index

    scan = scan_tar(folder / "shard-2.tar")
    write_index(folder / "shard-2.tar", [s.offset for s in scan.samples] + [scan.end])
    found = problems(folder)
    assert found[".info.json"][0].startswith(
        "shard counts differ from the shards for 1 shard(s), first shard-2.tar"
    )
    assert found["wdinfo.pkl"] == ["total_key_count 12 but the shards hold 9 samples — fix: list the folder "
                                   f"anew: prep run generate_wdinfo --set generate_wdinfo.input_dir={folder}"]
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert (
        result.exit_code == 1 and "bad metadata: " in result.output and "verified 3 shards" in result.output
    )
    assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True), Console(quiet=True)).ok
    assert problems(folder) == {}


def test_stale_loader_metadata_is_caught_beside_a_stale_manifest(folder: Path) -> None:
    """A shard re-cut after generate_wdinfo: the manifest, energon's counts and wdinfo.pkl are all stale,
    and each is named; the counts compared are the shard's as scanned, not the manifest's."""
    from prep.formats.index import write_index

    write_shard(folder / "shard-2.tar", [("2_0", {"jpg": b"1", "txt": b"c"})], fsync=False)  # now 1 sample
    scan = scan_tar(folder / "shard-2.tar")
    write_index(folder / "shard-2.tar", [s.offset for s in scan.samples] + [scan.end])
    checks = {Path(c.path).name: c for c in verify_folder(folder)}
    assert checks["shard-2.tar"].samples == 1
    assert checks["shard-2.tar"].problems[0].startswith("manifest says 4 samples, the tar has 1")
    assert checks[".info.json"].problems[0].startswith("shard counts differ from the shards for 1 shard(s), "
                                                       "first shard-2.tar: says 4, has 1")
    assert checks["wdinfo.pkl"].problems[0].startswith("total_key_count 12 but the shards hold 9 samples")
