"""Errors that name their place, as a user meets them through `prep run`: one line (what, where, fix) and
a non-zero exit, blamed on what caused them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep.cli import app

runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error: ")]


@pytest.mark.parametrize(("assignment", "expected"), [
    ("nosuchstage.x=1", "error: --set nosuchstage.x: unknown key nosuchstage "),
    ("nosuchstage=1", "error: --set nosuchstage: unknown key nosuchstage "),
    ("reorganize_tar.nokey=1", "error: --set reorganize_tar.nokey: unknown key reorganize_tar.nokey "),
    ("reorganize_tar.tar_chunk_size=0", "error: --set reorganize_tar.tar_chunk_size: reorganize_tar."
     "tar_chunk_size: Input should be greater than or equal to 1"),
    ("reorganize_tar.tar_chunk_size.x=1", "error: --set reorganize_tar.tar_chunk_size.x: reorganize_tar."
     "tar_chunk_size: Input should be a valid integer"),
    (" reorganize_tar..tar_chunk_size =0", "error: --set reorganize_tar..tar_chunk_size: "),
    ("reorganize_tar={tail: bad}", "error: --set reorganize_tar: reorganize_tar.tail: Input should be"),
    ("reorganize_tar.tar_chunk_size=${nope_13}", "error: --set reorganize_tar.tar_chunk_size: "
     "reorganize_tar.tar_chunk_size: ${nope_13} is neither a config key nor an environment variable"),
    ("reorganize_tar.tail.x=1", "error: --set reorganize_tar.tail.x: 'tail' is a value, not a section"),
    ("no_equals_sign", "error: --set: 'no_equals_sign' has no '='"),
])
def test_set_errors_name_the_set_and_the_key_as_typed(tmp_path: Path, assignment: str, expected: str) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("reorganize_tar:\n  tail: keep\n")
    got = runner.invoke(app, ["run", "reorganize_tar", "-c", str(config), "--set", assignment],
                        terminal_width=400)
    assert got.exit_code == 1
    (line,) = error_lines(got.output)
    assert line.startswith(expected) and "ok.yaml" not in line and " — fix: " in line


def test_file_errors_stay_with_the_file_beside_a_set(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("reorganize_tar:\n  tail: keep\n  tar_chunk_size: 0\n")
    args = ["run", "reorganize_tar", "-c", str(config), "--set", "reorganize_tar.tail=drop"]
    got = runner.invoke(app, args, terminal_width=400)
    assert got.exit_code == 1
    assert error_lines(got.output) == [f"error: {config}:3: reorganize_tar.tar_chunk_size: Input should be "
                                       "greater than or equal to 1 (got 0) — fix: correct the value"]


@pytest.mark.parametrize("bad", ["../A/000000.tar", "/abs/000000.tar", "x/../../A/000000.tar", "..\\A\\0.tar",
                                 "C:/A/000000.tar", "", "x/.."])
def test_shard_paths_leaving_the_dataset_are_refused_alike_by_wdinfo_and_manifest(tmp_path: Path,
                                                                                   bad: str) -> None:
    from prep.errors import PrepError
    from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
    from prep.formats.tar_write import write_shard
    from prep.formats.wdinfo import write_wdinfo
    from prep.loaders import ShardDataset

    outside, dataset = tmp_path / "A", tmp_path / "B"
    write_shard(outside / "000000.tar", [(f"k{i}", {"txt": b"x"}) for i in range(3)], fsync=False)
    write_shard(dataset / "000000.tar", [(f"k{i}", {"txt": b"x"}) for i in range(3)], fsync=False)
    write_wdinfo(dataset / "wdinfo.pkl", ["000000.tar"], 3, 3)
    assert ShardDataset(dataset / "wdinfo.pkl", batch_size=1, rank=0, world_size=1).total == 3
    write_wdinfo(dataset / "wdinfo.pkl", ["000000.tar", bad], 3, 6)
    with pytest.raises(PrepError) as refused:
        ShardDataset(dataset / "wdinfo.pkl", batch_size=1, rank=0, world_size=1)
    assert refused.value.what == f"tar_files path {bad!r} leaves the dataset folder"
    assert refused.value.where == str(dataset / "wdinfo.pkl") and "\n" not in refused.value.line()
    write_manifest(dataset, Manifest([ShardEntry(bad, 3, 10240, "xxh3_128:0")]))
    with pytest.raises(PrepError, match=r"manifest shard path .* leaves the dataset folder"):
        read_manifest(dataset)
    got = runner.invoke(app, ["verify", str(dataset)], terminal_width=400)
    assert got.exit_code == 1 and "leaves the dataset folder" in got.output


def reorganize_args(inp: Path, out: Path) -> list[str]:
    return ["run", "reorganize_tar", "--set", f"reorganize_tar.input_dir={inp}", "--set",
            f"reorganize_tar.output_dir={out}", "--set", "reorganize_tar.tar_chunk_size=1", "--quiet"]


CANNOT_WRITE = {
    "file": ("the output folder is a file", "or move the file away"),
    "under_a_file": ("cannot write the output folder (Not a directory)", "or fix its permissions"),
    "read_only": ("cannot write the output folder (Permission denied)", "or fix its permissions"),
}


@pytest.mark.parametrize("make", list(CANNOT_WRITE))
def test_an_output_folder_that_cannot_be_written_is_one_error_up_front(tmp_path: Path, make: str) -> None:
    from prep.formats.tar_write import write_shard

    if make == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    inp = tmp_path / "raw"
    write_shard(inp / "a.tar", [(f"k{i}", {"txt": b"x"}) for i in range(20)], fsync=False)
    (tmp_path / "taken").write_text("a file")
    out = {"file": tmp_path / "taken", "under_a_file": tmp_path / "taken" / "out",
           "read_only": tmp_path / "ro"}[make]
    if make == "read_only":
        out.mkdir(mode=0o500)
    got = runner.invoke(app, reorganize_args(inp, out), terminal_width=400)
    assert got.exit_code == 1
    (line,) = [ln for ln in got.output.splitlines() if ln.strip()]  # one line, not one per task (20)
    what, fix = CANNOT_WRITE[make]
    assert line == (f"error: {out}: {what} — fix: set reorganize_tar.output_dir (or dataset_output_root) "
                    f"to a folder you can write, {fix}")


def test_the_summary_prints_each_repeated_error_once_with_its_count() -> None:
    from rich.console import Console

    from prep.runtime.runner import StageRun
    from prep.runtime.summary import print_summary
    from prep.stages.base import TaskResult

    run = StageRun("reorganize_tar", 1003)
    run.results = [TaskResult(f"{j:06d}.tar", "failed", error="OSError: [Errno 28] No space left on device")
                   for j in range(1000)]
    run.results += [TaskResult("a.tar", "failed", error="a.tar: shard not found"), TaskResult("b.tar")]
    run.errors = ["reorganize_tar: finalize failed"]
    console = Console(record=True, width=400)
    print_summary(run, console)
    errors = [ln for ln in console.export_text().splitlines() if ln.startswith("error: ")]
    assert errors == ["error: 000000.tar: OSError: [Errno 28] No space left on device (× 1,000 tasks, "
                      "000000.tar … 000999.tar)", "error: a.tar: a.tar: shard not found",
                      "error: reorganize_tar: finalize failed"]
    assert len(run.to_json()["errors"]) == 1002  # the JSON keeps every task's error for machines
