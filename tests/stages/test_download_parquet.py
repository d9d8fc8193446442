"""download_parquet against a loopback server speaking the hub's HTTP API (real huggingface_hub client),
and against local paths: listing, pattern, revision, auth header, token hygiene, exact splits, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.config import load_config
from prep.errors import PrepError
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions
from prep.stages.download_parquet import part_rows, stem_of
from prep.testing.servers import free_port, serve_hub

TOKEN = "hf_TestTokenThatMustNeverBePrinted123"
REPO = "org/tiny-laion"


def _parquet(rows: int, tag: str, row_group_size: int = 4) -> bytes:
    table = pa.table({"URL": [f"http://x/{tag}/{i}.jpg" for i in range(rows)],
                      "TEXT": [f"{tag} caption {i}" for i in range(rows)],
                      "similarity": [i / 100 for i in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


FILES_MAIN = {"data/train-00000.parquet": _parquet(10, "a"), "data/train-00001.parquet": _parquet(7, "b"),
              "README.md": b"# tiny\n", "extra/notes.csv": b"a,b\n"}
FILES_V1 = {"data/train-00000.parquet": _parquet(5, "old")}


@pytest.fixture
def hub(monkeypatch):
    with serve_hub(REPO, {"main": FILES_MAIN, "v1": FILES_V1}, token=TOKEN, page_size=2) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield srv


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _sets(root: Path, *extra: str) -> list[str]:
    return [f"dataset_repo_id={REPO}", f"dataset_output_root={root}", *extra]


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
                     and p.suffix != ".parquet")


def test_hub_download_splits_exactly_and_never_shows_the_token(hub, tmp_path):
    args = ["run", "download_parquet", "--json"]
    for s in _sets(tmp_path, "download_parquet.parquet_subpartitions=3",
                   f"download_parquet.hf_token={TOKEN}"):
        args += ["--set", s]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["counts"]["rows"] == 17 and doc["counts"]["files_downloaded"] == 2
    out = tmp_path / "parquet"
    for name, rows in (("data__train-00000", 10), ("data__train-00001", 7)):
        parts = [pq.read_table(out / f"{name}.part{k}.parquet") for k in range(3)]
        assert [t.num_rows for t in parts] == part_rows(rows, 3)
        original = pq.read_table(io.BytesIO(FILES_MAIN[f"data/{name.split('__')[1]}.parquet"]))
        assert pa.concat_tables(parts).equals(original)  # same rows, same order
        assert (out / "source" / "data" / f"{name.split('__')[1]}.parquet").is_file()  # original kept
    # only the matching files were fetched, each once, and every request carried the token
    assert sorted(hub.downloads()) == ["data/train-00000.parquet", "data/train-00001.parquet"]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert len([r for r in hub.requests if "/tree/" in r.path]) >= 2  # the listing was paged
    assert TOKEN not in res.output and TOKEN not in _all_text(tmp_path)
    dry = _cli(*args, "--dry-run")
    assert TOKEN not in dry.output

    # a re-run with --force downloads nothing (present and verified), and gives the same parts
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    res = _cli(*args, "--force")
    assert res.exit_code == 0 and json.loads(res.stdout)["counts"]["files_downloaded"] == 0
    assert len(hub.downloads()) == 2
    # a truncated original (a partial file) is never taken for a whole one: it is fetched again
    src = out / "source" / "data" / "train-00001.parquet"
    src.write_bytes(src.read_bytes()[:100])
    res = _cli(*args, "--force")
    assert res.exit_code == 0, res.output
    assert hub.downloads()[2:] == ["data/train-00001.parquet"]
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_revision_token_from_env_and_markers_skip(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = load_config(None, _sets(tmp_path, "download_parquet.revision=v1"))
    run = run_stage("download_parquet", cfg, RunOptions(quiet=True))
    assert run.ok, run.to_json()
    part = pq.read_table(tmp_path / "parquet" / "data__train-00000.part0.parquet")
    assert part.column("TEXT")[0].as_py() == "old caption 0" and part.num_rows == 5
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    again = run_stage("download_parquet", cfg, RunOptions(quiet=True))
    assert [r.status for r in again.results] == ["skipped"]


def test_private_repo_without_token_is_one_clear_error(hub, tmp_path):
    res = _cli("run", "download_parquet", *[a for s in _sets(tmp_path) for a in ("--set", s)])
    assert res.exit_code == 1
    assert "not accessible" in res.output and "HF_TOKEN" in res.output and "Traceback" not in res.output
    assert all("authorization" not in r.headers for r in hub.requests)


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_offline_fails_at_once_and_names_source_path(tmp_path, monkeypatch, capfd, how):
    port = free_port()  # nothing listens on it: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, _sets(tmp_path))
    with pytest.raises(PrepError) as err:
        run_stage("download_parquet", cfg, RunOptions(quiet=True))
    assert "download_parquet.source_path" in err.value.line()
    assert ("cannot reach the hub" if how == "unreachable" else "HF_HUB_OFFLINE") in err.value.line()
    out, errs = capfd.readouterr()
    assert "Retrying" not in out + errs, "the hub client's retries ran before the error"


def test_pattern_matching_nothing_and_missing_columns_name_what_exists(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = load_config(None, _sets(tmp_path, "download_parquet.parquet_pattern=*.arrow"))
    with pytest.raises(PrepError, match="parquet_pattern"):
        run_stage("download_parquet", cfg, RunOptions(quiet=True))
    cfg = load_config(None, _sets(tmp_path, "download_images.url_col=url"))
    run = run_stage("download_parquet", cfg, RunOptions(quiet=True))
    assert not run.ok
    err = run.to_json()["errors"][0]
    assert "'url'" in err and "'URL', 'TEXT', 'similarity'" in err


def test_local_glob_source_delete_source_and_columns_checked_before_any_task(tmp_path):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "train.parquet").write_bytes(_parquet(9, "a"))
    (src / "b" / "train.parquet").write_bytes(_parquet(2, "b"))
    base = [f"dataset_output_root={tmp_path / 'out'}", f"download_parquet.source_path={src}/*/train.parquet",
            "download_parquet.parquet_subpartitions=4"]
    run = run_stage("download_parquet", load_config(None, base), RunOptions(quiet=True))
    assert run.ok, run.to_json()
    out = tmp_path / "out" / "parquet"
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == [f"{s}__train.part{k}.parquet" for s in "ab" for k in range(4)]  # no name collides
    assert [pq.read_metadata(out / f"b__train.part{k}.parquet").num_rows for k in range(4)] == [1, 1, 0, 0]
    assert (src / "a" / "train.parquet").exists()  # inputs are kept by default
    run = run_stage("download_parquet", load_config(None, [*base, "download_parquet.delete_source=true"]),
                    RunOptions(quiet=True))
    assert run.ok
    assert not (src / "a" / "train.parquet").exists() and not (src / "b" / "train.parquet").exists()
    parts = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    again = run_stage("download_parquet", load_config(None, [*base, "download_parquet.delete_source=true"]),
                      RunOptions(quiet=True))  # the sources it deleted are done, not "no file matches"
    assert again.ok and {r.status for r in again.results} == {"skipped"} and len(again.results) == 2
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == parts

    (src / "c.parquet").write_bytes(_parquet(3, "c"))
    folder = [f"dataset_output_root={tmp_path / 'o3'}", f"download_parquet.source_path={src}"]  # a folder
    run = run_stage("download_parquet", load_config(None, folder), RunOptions(quiet=True))
    assert run.ok and [r.task_id for r in run.results] == ["c"]
    bad = [f"dataset_output_root={tmp_path / 'o2'}", f"download_parquet.source_path={src}/c.parquet",
           "download_images.caption_col=caption"]
    with pytest.raises(PrepError, match="'caption' not found; the file has: 'URL', 'TEXT'"):
        run_stage("download_parquet", load_config(None, bad), RunOptions(quiet=True))
    assert not (tmp_path / "o2" / "parquet").exists()


def test_http_source_path_is_fetched_split_and_skipped_on_rerun(tmp_path):
    """An http(s) URL (a web server, a hub resolve URL) works as an fsspec source_path: the file is
    fetched once into source/, split exactly, and a re-run finds the task done."""
    from prep.testing.servers import serve_files

    (tmp_path / "srv").mkdir()
    data = _parquet(11, "web")
    (tmp_path / "srv" / "train.parquet").write_bytes(data)
    with serve_files(tmp_path / "srv") as srv:
        sets = [f"dataset_output_root={tmp_path / 'out'}", "download_parquet.parquet_subpartitions=3",
                f"download_parquet.source_path={srv.url}/train.parquet"]
        run = run_stage("download_parquet", load_config(None, sets), RunOptions(quiet=True))
        assert run.ok, run.to_json()["errors"]
        out = tmp_path / "out" / "parquet"
        parts = [pq.read_table(out / f"train.part{k}.parquet") for k in range(3)]
        assert pa.concat_tables(parts).equals(pq.read_table(io.BytesIO(data)))
        assert [t.num_rows for t in parts] == part_rows(11, 3)
        assert (tmp_path / "out" / "parquet" / "source" / "train.parquet").read_bytes() == data
        before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
        again = run_stage("download_parquet", load_config(None, sets), RunOptions(quiet=True))
        assert again.ok and again.nothing_to_do
        assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_fewer_subpartitions_leave_no_parts_of_the_earlier_split(tmp_path):
    """Parts of an earlier split into more parts would be read by download_images beside the new ones,
    fetching their rows twice: the parts folder holds each source row exactly once, in order."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.parquet").write_bytes(_parquet(10, "a"))
    (src / "a.part1.parquet").write_bytes(_parquet(3, "p"))  # another source whose stem starts alike
    for k in (4, 2):
        cfg = load_config(None, [f"dataset_output_root={tmp_path / 'out'}",
                                 f"download_parquet.source_path={src}",
                                 f"download_parquet.parquet_subpartitions={k}"])
        assert run_stage("download_parquet", cfg, RunOptions(quiet=True)).ok
    out = tmp_path / "out" / "parquet"
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "a.part0.parquet", "a.part1.parquet", "a.part1.part0.parquet", "a.part1.part1.parquet"]
    urls = [u for k in range(2) for u in pq.read_table(out / f"a.part{k}.parquet")["URL"].to_pylist()]
    assert urls == pq.read_table(src / "a.parquet")["URL"].to_pylist()


def test_resplitting_a_deleted_source_says_it_cannot_be_done(tmp_path):
    """delete_source removed the file: other settings cannot re-split it, and re-running (the generic
    advice for a file gone since planning) never helps."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.parquet").write_bytes(_parquet(6, "a"))
    for k in (3, 2):
        cfg = load_config(None, [f"dataset_output_root={tmp_path / 'out'}",
                                 f"download_parquet.source_path={src}", "download_parquet.delete_source=true",
                                 f"download_parquet.parquet_subpartitions={k}"])
        result = run_stage("download_parquet", cfg, RunOptions(quiet=True))
    assert not result.ok
    assert "deleted once its parts were written (delete_source: true)" in result.failed[0].error
    assert "parquet_subpartitions back" in result.failed[0].error


def test_part_rows_and_stems():
    assert part_rows(10, 3) == [4, 3, 3] and part_rows(2, 4) == [1, 1, 0, 0]
    assert sum(part_rows(1001, 7)) == 1001
    assert stem_of("data/train-00000.parquet") == "data__train-00000" and stem_of("x.parquet") == "x"


def test_files_kept_in_git_are_checked_by_blob_id(tmp_path, monkeypatch):
    """Without LFS the hub lists only the git blob id: a same-size but altered file is fetched again."""
    with serve_hub(REPO, {"main": FILES_MAIN}, lfs_suffixes=()) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        cfg = load_config(None, _sets(tmp_path, "download_parquet.parquet_pattern=train-00000.parquet"))
        assert run_stage("download_parquet", cfg, RunOptions(quiet=True)).ok
        src = tmp_path / "parquet" / "source" / "data" / "train-00000.parquet"
        data = bytearray(src.read_bytes())
        data[len(data) // 2] ^= 0xFF
        src.write_bytes(bytes(data))
        assert run_stage("download_parquet", cfg, RunOptions(quiet=True, force=True)).ok
        assert srv.downloads() == ["data/train-00000.parquet"] * 2
        assert src.read_bytes() == FILES_MAIN["data/train-00000.parquet"]


def test_a_presigned_url_is_one_file_and_its_signature_is_in_no_name_record_or_message(tmp_path):
    """A presigned URL's query is part of its address, not a glob, and holds a credential: the parts
    are named from the path alone, and neither the outputs, the records nor an error quote it."""
    from prep.testing.servers import serve_files

    (tmp_path / "srv").mkdir()
    data = _parquet(7, "signed")
    (tmp_path / "srv" / "train.parquet").write_bytes(data)
    secret = "X-Amz-Signature=0123456789abcdef"
    out = tmp_path / "out" / "parquet"

    def bookkept() -> str:
        return "\n".join(str(p) + (p.read_text("utf-8", "replace") if p.is_file() else "")
                         for p in (tmp_path / "out").rglob("*"))

    with serve_files(tmp_path / "srv") as srv:
        sets = [f"dataset_output_root={tmp_path / 'out'}", "download_parquet.parquet_subpartitions=2",
                f"download_parquet.source_path={srv.url}/train.parquet?{secret}&X-Amz-Date=1"]
        run = run_stage("download_parquet", load_config(None, sets), RunOptions(quiet=True))
        assert run.ok, run.to_json()["errors"]
        parts = [pq.read_table(out / f"train.part{k}.parquet") for k in range(2)]
        assert pa.concat_tables(parts).equals(pq.read_table(io.BytesIO(data)))
        assert secret not in bookkept()
        missing = [*sets[:2], f"download_parquet.source_path={srv.url}/gone.parquet?{secret}"]
        with pytest.raises(PrepError) as err:
            run_stage("download_parquet", load_config(None, missing), RunOptions(quiet=True))
    assert "gone.parquet" in str(err.value) and secret not in str(err.value)
    assert secret not in json.dumps(run.to_json())
