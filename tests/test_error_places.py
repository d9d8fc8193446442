"""Errors that name their place, as a user meets them through `prep run`: one line (what, where, fix) and
a non-zero exit, blamed on what caused them."""

from __future__ import annotations

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
