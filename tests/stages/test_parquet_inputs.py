"""Bad parquet inputs as a user meets them through `prep run`: a file named .parquet that is none, an empty
part, and null URLs are each named in one line (what, where, fix) or counted under their own reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.testing.servers import serve_images, url_table

runner = CliRunner()


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def images_run(root: Path, inp: Path, *extra: str) -> list[str]:
    args = ["run", "download_images", "--quiet", "--set", f"dataset_output_root={root}", "--set",
            f"download_images.input_dir={inp}", "--set", "download_images.download_num_processes=1",
            "--set", "download_images.timeout=1"]
    for e in extra:
        args += ["--set", e]
    return args


@pytest.mark.parametrize("content", [b"", b"PAR1 but then not", b"url,caption\nhttp://x/1.jpg,a\n"])
def test_a_file_that_is_no_parquet_is_named_in_both_parquet_stages(tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(url_table([("http://x/1.jpg", "a")]), src / "good.parquet")
    (src / "bad.parquet").write_bytes(content)
    got = runner.invoke(app, ["run", "download_parquet", "--set", f"dataset_output_root={tmp_path / 'out'}",
                              "--set", f"download_parquet.source_path={src}"], terminal_width=400)
    assert got.exit_code == 1
    line = one_error_line(got.output)
    assert f"{src / 'bad.parquet'}: not a readable parquet file" in line
    assert "fix: replace it with a real parquet file, or narrow download_parquet.source_path" in line

    got = runner.invoke(app, images_run(tmp_path / "out2", src), terminal_width=400)
    assert got.exit_code == 1
    line = one_error_line(got.output)
    assert f"{src / 'bad.parquet'}: not a readable parquet file" in line
    assert "fix: replace it with a real parquet file" in line and "download_images.input_dir" in line


def test_only_empty_parts_is_an_error_naming_one(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(url_table([]), inp / "a.part0.parquet")
    got = runner.invoke(app, images_run(tmp_path / "out", inp), terminal_width=400)
    assert got.exit_code == 1
    line = one_error_line(got.output)
    assert f"{inp}: every parquet part is empty (0 rows), e.g. a.part0.parquet" in line


@pytest.mark.slow
def test_an_empty_part_is_named_and_null_urls_have_their_own_reason(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(url_table([]), inp / "a.part0.parquet")
    with serve_images() as srv:
        rows = [(srv.good(64, 48, 1), "ok"), (None, "null"), ("", "empty"), ("not a url", "bad")]
        pq.write_table(url_table(rows), inp / "b.part0.parquet")
        got = runner.invoke(app, [*images_run(tmp_path / "out", inp), "--json"])
    assert got.exit_code == 0, got.output
    # img2dataset prints to sys.stdout, which CliRunner captures above prep's fd-level redirection
    doc = json.loads(got.stdout[got.stdout.index('{\n "stage"'):])
    assert doc["tasks_planned"] == 2 and doc["counts"]["parts_empty"] == 1
    assert doc["dropped"] == {"url_missing": 2, "bad_url": 1}
    empty = f"{inp / 'a.part0.parquet'}: the part is empty (0 rows); nothing to download from it"
    assert empty in doc["notes"]
