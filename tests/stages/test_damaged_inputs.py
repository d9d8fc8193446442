"""Damaged and empty input tars as a user meets them through `prep run reorganize_tar` and `prep inspect`:
every whole sample before the damage is repacked and counted, and each bad input is named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from typer.testing import CliRunner

from prep.cli import app
from prep.formats.tar import scan_tar

runner = CliRunner()


def eight_samples(path: Path) -> list[int]:
    """8 samples (jpg + txt) written by tarfile; returns each sample's first header offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(8):
            for ext, size in (("jpg", 900 + i), ("txt", 12)):
                info = tarfile.TarInfo(f"{path.stem}{i}.{ext}")
                info.size = size
                t.addfile(info, io.BytesIO(b"x" * size))
    with tarfile.open(path) as t:
        return [m.offset for m in t.getmembers() if m.name.endswith(".jpg")]


def damaged_inputs(inp: Path) -> None:
    starts = eight_samples(inp / "a.tar")  # garbage over the 4th sample's first header: 3 whole before it
    blob = bytearray((inp / "a.tar").read_bytes())
    blob[starts[3] : starts[3] + 512] = b"\x9c" * 512
    (inp / "a.tar").write_bytes(bytes(blob))
    starts = eight_samples(inp / "b.tar")  # cut inside the 7th sample's first header: 6 whole before it
    (inp / "b.tar").write_bytes((inp / "b.tar").read_bytes()[: starts[6] + 100])
    (inp / "c.tar").write_bytes(b"")  # zero bytes
    tarfile.open(inp / "d.tar", "w").close()  # a real tar with no member


def test_reorganize_repacks_and_counts_every_whole_sample_and_names_bad_inputs(tmp_path: Path) -> None:
    inp, out = tmp_path / "raw", tmp_path / "out"
    damaged_inputs(inp)
    args = ["run", "reorganize_tar", "--set", f"reorganize_tar.input_dir={inp}", "--set",
            f"reorganize_tar.output_dir={out}", "--set", "reorganize_tar.tar_chunk_size=4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    counts = doc["counts"]
    assert counts["samples_in"] == counts["samples_out"] == 3 + 6
    assert counts["damaged_tars"] == 3 and counts["inputs_empty"] == 2
    notes = "\n".join(doc["notes"])
    assert "a.tar: damaged at byte" in notes and "kept the 3 whole samples" in notes
    assert "b.tar: damaged at byte" in notes and "kept the 6 whole samples" in notes
    assert "c.tar: damaged at byte 0 (the file is empty (0 bytes)" in notes
    assert "d.tar: holds no samples" in notes
    keys = [s.key for p in sorted(out.glob("*.tar")) for s in scan_tar(p).samples]
    assert keys == [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(6)]
    strict = runner.invoke(app, [*args[:-1], "--strict", "--force"])
    assert strict.exit_code == 1 and "3 input tar(s) are truncated or corrupt" in strict.output


def test_inspect_shows_every_whole_sample_before_the_damage(tmp_path: Path) -> None:
    damaged_inputs(tmp_path)
    shown = runner.invoke(app, ["inspect", str(tmp_path / "a.tar"), "-n", "0"], terminal_width=250)
    assert shown.exit_code == 1 and "3 samples" in shown.output and "a2" in shown.output
    assert "corrupt tar header" in shown.output and "the samples above come before the damage" in shown.output
    cut = runner.invoke(app, ["inspect", str(tmp_path / "b.tar"), "-n", "0"], terminal_width=250)
    assert cut.exit_code == 1 and "6 samples" in cut.output and "b5" in cut.output
    empty = runner.invoke(app, ["inspect", str(tmp_path / "c.tar")], terminal_width=250)
    assert empty.exit_code == 1 and empty.output.count("\n") == 1
    assert f"{tmp_path / 'c.tar'}: the file is empty (0 bytes)" in empty.output
