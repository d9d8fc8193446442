"""ingest_local on real files: exact accounting over a folder with nested dirs, three formats, sidecar
captions, a corrupt file, an image without caption, duplicate stems and unicode names; captions files
(FluxFlow TSV, JSON, JSONL, CSV); tables of paths with a missing file; original bytes kept; resizing with
img2dataset's Resizer and EXIF orientation; a SIGKILLed run resumed to the same bytes; and the result
through reorganize_tar -> generate_wdinfo into energon and prep's ShardDataset."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from prep.config import load_config
from prep.errors import PrepError
from prep.formats.names import member_name
from prep.formats.tar import iter_samples, scan_tar
from prep.runtime.runner import run_stage
from prep.stages import ingest_local as il
from prep.stages.base import RunOptions
from prep.testing.servers import CORRUPT_IMAGE, make_image

QUIET = Console(quiet=True)


def run(root: Path, *sets: str, workers: int = 1):
    cfg = load_config(None, [f"dataset_output_root={root}", *sets])
    return run_stage("ingest_local", cfg, RunOptions(workers=workers, quiet=True), QUIET)


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every tar under `out`, by key: {ext: bytes}."""
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.rglob("*.tar")):
        with open(tar, "rb") as f:
            for sample in iter_samples(f, str(tar), read_data=True):
                assert sample.key not in found and sample.data is not None
                found[sample.key] = sample.data
    return found


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prep" not in p.relative_to(folder).parts}


FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}


def image_folder(root: Path) -> dict[str, tuple[bytes, str | None]]:
    """The test folder; returns {relative path: (bytes, caption or None)} for the good images."""
    good: dict[str, tuple[bytes, str | None]] = {}

    def put(rel: str, caption: str | None = None, sidecar: str = "txt", seed: int = 0) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make_image(6 + seed, 4 + seed % 3, FORMATS[rel.rsplit(".", 1)[1]], seed)
        path.write_bytes(data)
        if caption is not None:
            path.with_suffix(f".{sidecar}").write_text(caption + "\n", "utf-8")
        good[rel] = (data, caption)

    put("cats/cat.png", "a cat", seed=1)
    put("dogs/cat.png", "a dog called cat", "caption", seed=2)  # the same stem in another folder
    put("dogs/deep/er/dog.jpg", "a dog", seed=3)
    put("dogs/deep/er/dog.webp", "a dog", seed=4)  # the same stem, another format: one sidecar for both
    put("Ünïcødé/кошка 1.jpeg", "кошка", seed=5)
    put("no caption.png", None, seed=6)
    (root / "broken.jpg").write_bytes(make_image(20, 20, "jpeg", 7)[:200])  # cut short
    (root / "noise.png").write_bytes(CORRUPT_IMAGE)
    (root / "README.md").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(make_image(4, 4, "png"))
    return good


# ------------------------------------------------------------------------------------------- unit tests


def test_keys_are_stable_unique_and_safe_member_names() -> None:
    rng = random.Random(0)
    alphabet = "aZ09_-. /ключÜ漢😀" + "\t'\"\\"
    rels = {"a/x.png", "b/x.png", "a/x.jpg", "a/x", "a_x.png", "x.tar.gz", "../x.png", "кошка.png"}
    while len(rels) < 3000:
        rels.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))))
    keys = {il.sample_key(r): r for r in rels}
    assert len(keys) == len(rels)  # unique, including duplicate stems and unicode-only names
    for key, rel in keys.items():
        assert member_name(key, "jpg", "test") == f"{key}.jpg" and key.isascii() and len(key) <= 77
        assert il.sample_key(rel) == key
    assert il.sample_key("cats/cat.png").startswith("cats_cat_")


def test_needs_resize_and_size_filter_follow_img2dataset() -> None:
    assert not il.needs_resize("no", 10, False, 100, 100)
    assert il.needs_resize("center_crop", 64, False, 10, 10)  # upscales unless only_if_bigger
    assert not il.needs_resize("center_crop", 64, True, 10, 500)
    assert il.needs_resize("keep_ratio", 64, True, 65, 500)
    assert not il.needs_resize("border", 64, True, 64, 10)
    assert il.needs_resize("keep_ratio_largest", 64, True, 10, 65)
    args = {"min_image_size": 5, "max_image_area": 100.0, "max_aspect_ratio": 3.0}
    assert [il.size_filter(w, h, args) for w, h in ((4, 9), (11, 10), (16, 5), (10, 10))] == [
        "too_small", "area_too_large", "aspect_ratio_too_large", None]


# ------------------------------------------------------------------------------------------------ folder


def test_folder_exact_accounting_original_bytes_and_report(tmp_path: Path) -> None:
    good = image_folder(tmp_path / "imgs")
    result = run(tmp_path, "ingest_local.enable=true", f"ingest_local.input_dir={tmp_path / 'imgs'}",
                 "ingest_local.number_sample_per_shard=3")
    assert result.ok and result.finalized, result.to_json()
    counts = result.counts()
    assert (counts["samples_in"], counts["samples_out"], counts["shards"]) == (8, 6, 3)
    assert result.dropped() == {"decode_error": 2}
    assert (counts["failed_to_resize"], counts["failed_to_download"], counts["without_caption"]) == (2, 0, 1)
    assert counts["kept_original_bytes"] == 6 and counts["reencoded"] == 0
    out = tmp_path / "tarfiles_ingested"
    samples = shard_samples(out)
    assert len(samples) == 6
    for rel, (data, caption) in good.items():
        members = samples[il.sample_key(rel)]
        ext = {"jpeg": "jpg"}.get(FORMATS[rel.rsplit(".", 1)[1]], FORMATS[rel.rsplit(".", 1)[1]])
        assert set(members) == {ext, "txt", "json"} and members[ext] == data  # the original bytes
        meta = json.loads(members["json"])
        assert meta["path"] == rel and meta["caption"] == (caption or "")
        assert members["txt"].decode() == meta["caption"]
        assert (meta["width"], meta["height"]) == (meta["original_width"], meta["original_height"])
        assert meta["sha256"] and meta["key"] == il.sample_key(rel)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("imgs/*_stats.json"))]
    assert sum(s["count"] for s in stats) == 8 and sum(s["successes"] for s in stats) == 6
    assert Counter() + sum((Counter(s["status_dict"]) for s in stats), Counter()) == {"success": 6,
                                                                                     "decode_error": 2}
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("imgs/*.parquet"))]).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted([*good, "broken.jpg", "noise.png"])
    bad = {r["path"]: r for r in rows if r["status"] != "success"}
    assert set(bad) == {"broken.jpg", "noise.png"}
    assert all(r["status"] == "failed_to_resize" for r in bad.values())
    report = [json.loads(line) for line in (out / ".prep" / il.DROPPED_REPORT).read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in report] == [("broken.jpg", "decode_error"),
                                                          ("noise.png", "decode_error")]
    notes = "\n".join(result.to_json()["notes"])
    assert "1 other file(s)" in notes and "'broken.jpg' (decode_error)" in notes
    again = run(tmp_path, "ingest_local.enable=true", f"ingest_local.input_dir={tmp_path / 'imgs'}",
                "ingest_local.number_sample_per_shard=3")
    assert again.to_json()["skipped"] == 3 and again.counts() == counts


def test_upper_case_extensions_are_images_under_lower_case_member_names(tmp_path: Path) -> None:
    """`.JPG`, `.Jpeg`, `.PNG` are ingested, each under its decoded format's name (`jpg`, `png`); `a.jpg`
    beside `a.JPG` are two files, so two samples (keys hash the whole path), never one lost."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = {"photo.JPG": "jpeg", "b.Jpeg": "jpeg", "c.PNG": "png", "d.WebP": "webp", "a.jpg": "jpeg",
             "a.JPG": "jpeg"}
    for i, (name, fmt) in enumerate(files.items()):
        (folder / name).write_bytes(make_image(6, 4, fmt, i))
    (folder / "photo.txt").write_text("a photo")
    result = run(tmp_path, "ingest_local.enable=true", f"ingest_local.input_dir={folder}")
    assert result.ok and result.counts()["samples_out"] == len(files)
    samples = shard_samples(tmp_path / "tarfiles_ingested")
    by_path = {json.loads(m["json"])["path"]: m for m in samples.values()}
    assert set(by_path) == set(files)
    for name, fmt in files.items():
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
        assert set(by_path[name]) == {ext, "txt", "json"}
        assert by_path[name][ext] == (folder / name).read_bytes()
    assert by_path["photo.JPG"]["txt"] == b"a photo"


def test_symlinked_folders_are_read_once_and_broken_links_reported(tmp_path: Path) -> None:
    """A symlinked folder is read (its images count), a link back up makes no loop, and an entry that is
    neither a file nor a folder (a broken link) is named in the notes: nothing is left out silently."""
    imgs, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere"
    imgs.mkdir()
    elsewhere.mkdir()
    (imgs / "a.png").write_bytes(make_image(16, 16, "png", seed=1))
    for i in range(2):
        (elsewhere / f"b{i}.png").write_bytes(make_image(16, 16, "png", seed=2 + i))
    (imgs / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(imgs, target_is_directory=True)  # a loop through both folders
    (imgs / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    result = run(tmp_path, "ingest_local.enable=true", f"ingest_local.input_dir={imgs}")
    assert result.ok, result.to_json()
    assert result.counts()["samples_out"] == 3
    samples = shard_samples(tmp_path / "tarfiles_ingested").values()
    paths = sorted(json.loads(m["json"])["path"] for m in samples)
    assert paths == ["a.png", "linked/b0.png", "linked/b1.png"]
    notes = "\n".join(result.to_json()["notes"])
    assert "1 entry under" in notes and "'gone.jpg'" in notes


def test_a_file_name_that_is_not_utf8_is_ingested_with_its_path_escaped(tmp_path: Path) -> None:
    """Linux file names are bytes; one that is not UTF-8 cannot go into the json or the parquet as it is.
    It failed its whole shard ('UnicodeEncodeError ... surrogates not allowed', no file named); now the
    image is kept and its recorded path shows the odd byte as \\xff, everywhere the path is written."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(make_image(16, 16, "png", seed=1))
    with open(bytes(imgs) + b"/b\xff.png", "wb") as f:
        f.write(make_image(16, 16, "png", seed=2))
    result = run(tmp_path, "ingest_local.enable=true", f"ingest_local.input_dir={imgs}")
    assert result.ok, result.to_json()["errors"]
    samples = shard_samples(tmp_path / "tarfiles_ingested").values()
    assert sorted(json.loads(m["json"])["path"] for m in samples) == ["a.png", "b\\xff.png"]
    table = pq.read_table(next((tmp_path / "tarfiles_ingested").rglob("*.parquet")))
    assert sorted(table["path"].to_pylist()) == ["a.png", "b\\xff.png"]


def test_missing_caption_drop_and_captions_files(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    good = image_folder(folder)
    dropped = run(tmp_path / "a", f"ingest_local.input_dir={folder}", "ingest_local.missing_caption=drop")
    assert dropped.dropped() == {"decode_error": 2, "no_caption": 1}
    assert dropped.counts()["samples_out"] == 5
    names = {"cats/cat.png": "from the file", "no caption": "now captioned", "ghost.png": "no such image"}
    files = {
        "captions.txt": "".join(f"{n}\t{c}\n" for n, c in names.items()),
        "captions.json": json.dumps(names),
        "captions.jsonl": "".join(json.dumps({"path": n, "caption": c, "license": "cc0"}) + "\n"
                                  for n, c in names.items()),
        "captions.csv": "path,caption,license\n" + "".join(f"{n},{c},cc0\n" for n, c in names.items()),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, "utf-8")
        extra = ["ingest_local.save_additional_columns=[license]"] if name.endswith(("l", "v")) else []
        result = run(tmp_path / f"out-{name}", f"ingest_local.input_dir={folder}",
                     f"ingest_local.captions_file={tmp_path / name}", *extra)
        assert result.ok and result.counts()["without_caption"] == 0, name
        samples = shard_samples(tmp_path / f"out-{name}" / "tarfiles_ingested")
        assert samples[il.sample_key("cats/cat.png")]["txt"] == b"from the file"  # wins over the sidecar
        assert samples[il.sample_key("no caption.png")]["txt"] == b"now captioned"  # named without extension
        assert samples[il.sample_key("dogs/cat.png")]["txt"].decode() == good["dogs/cat.png"][1]
        meta = json.loads(samples[il.sample_key("cats/cat.png")]["json"])
        assert meta.get("license") == ("cc0" if extra else None)
        notes = "\n".join(result.to_json()["notes"])
        assert "name no image (first: 'ghost.png')" in notes and "1 other file(s)" in notes
    inside = folder / "captions.txt"  # in the folder: neither a sidecar nor an ignored file
    inside.write_text(files["captions.txt"])
    result = run(tmp_path / "inside", f"ingest_local.input_dir={folder}",
                 f"ingest_local.captions_file={inside}")
    notes = "\n".join(result.to_json()["notes"])
    assert result.ok and "1 other file(s)" in notes and "sidecar caption file(s) have no image" not in notes
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(PrepError, match="line 1 has no TAB"):
        run(tmp_path / "bad", f"ingest_local.input_dir={folder}",
            f"ingest_local.captions_file={tmp_path / 'bad.txt'}")


def test_plan_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match=r"exactly one of ingest_local\.input_dir"):
        run(tmp_path)
    with pytest.raises(PrepError, match="image folder does not exist"):
        run(tmp_path, f"ingest_local.input_dir={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="no image found"):
        run(tmp_path, f"ingest_local.input_dir={tmp_path / 'empty'}")
    with pytest.raises(PrepError, match=r"output_dir .* holds it"):
        run(tmp_path, f"ingest_local.input_dir={tmp_path / 'empty'}", f"ingest_local.output_dir={tmp_path}")
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "t.parquet")
    with pytest.raises(PrepError, match=r"column\(s\) 'path', 'caption' not found; it has: 'file'"):
        run(tmp_path, f"ingest_local.table={tmp_path / 't.parquet'}")


def test_shrunken_input_removes_stale_shards(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    image_folder(folder)
    assert run(tmp_path, f"ingest_local.input_dir={folder}", "ingest_local.number_sample_per_shard=2").ok
    assert len(list((tmp_path / "tarfiles_ingested" / "imgs").glob("*.tar"))) == 4
    for p in list(folder.rglob("*.png")):
        p.unlink()
    result = run(tmp_path, f"ingest_local.input_dir={folder}", "ingest_local.number_sample_per_shard=2")
    assert result.ok and result.counts()["samples_in"] == 4
    assert sorted(p.name for p in (tmp_path / "tarfiles_ingested" / "imgs").iterdir()) == [
        f"0000{i}{s}" for i in range(2) for s in (".parquet", ".tar", "_stats.json")]
    folder.rename(tmp_path / "renamed")  # another part folder: the old one is named, never deleted
    result = run(tmp_path, f"ingest_local.input_dir={tmp_path / 'renamed'}",
                 "ingest_local.number_sample_per_shard=2")
    assert "also holds tars in imgs" in "\n".join(result.to_json()["notes"])
    assert len(list((tmp_path / "tarfiles_ingested" / "imgs").glob("*.tar"))) == 2


# ------------------------------------------------------------------------------------------------- table


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_table_of_paths_with_missing_duplicate_and_empty_rows(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.webp"
    elsewhere.write_bytes(make_image(5, 5, "webp", 9))
    url = f"file://{tmp_path / 'data' / 'c.png'}"  # an fsspec URL: read through fsspec
    rows = [("sub/a.png", "first"), (str(elsewhere), "absolute"), ("sub/gone.jpg", "missing"),
            ("./sub/a.png", "same file again"), ("", "no path"), ("b.jpg", "second"), (url, "by url")]
    (tmp_path / "data" / "sub" / "a.png").write_bytes(make_image(7, 5, "png", 1))
    (tmp_path / "data" / "b.jpg").write_bytes(make_image(7, 5, "jpeg", 2))
    (tmp_path / "data" / "c.png").write_bytes(make_image(3, 4, "png", 3))
    table = pa.table({"path": [r[0] for r in rows], "caption": [r[1] for r in rows],
                      "score": [0.5, 0.25, 1.0, 0.0, 0.75, 0.125, 2.0]})
    path = tmp_path / "data" / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    result = run(tmp_path, f"ingest_local.table={path}", "ingest_local.save_additional_columns=[score]")
    assert result.ok, result.to_json()
    assert result.counts()["samples_in"] == 7 and result.counts()["samples_out"] == 4
    assert result.dropped() == {"missing_file": 1, "duplicate_path": 1, "no_path": 1}
    samples = shard_samples(tmp_path / "tarfiles_ingested" / "list")
    assert {json.loads(m["json"])["path"]: m["txt"].decode() for m in samples.values()} == {
        "sub/a.png": "first", str(elsewhere): "absolute", "b.jpg": "second", url: "by url"}
    assert samples[il.sample_key(f"list/{url}")]["png"] == (tmp_path / "data" / "c.png").read_bytes()
    assert samples[il.sample_key(f"list/{elsewhere}")]["webp"] == elsewhere.read_bytes()
    assert float(json.loads(samples[il.sample_key("list/b.jpg")]["json"])["score"]) == 0.125
    assert il.sample_key("list/b.jpg").startswith("list_b_")  # the part, then the path as written
    report = (tmp_path / "tarfiles_ingested" / ".prep" / il.DROPPED_REPORT).read_text()
    assert "sub/gone.jpg" in report and '"missing_file"' in report
    stats = json.loads((tmp_path / "tarfiles_ingested" / "list" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (7, 4, 3)


def test_server_errors_are_not_missing_files_and_the_next_run_retries_them(tmp_path: Path) -> None:
    """Over HTTP, a file that is gone (404, 410) is missing_file and stays done; a server error (5xx, 429)
    or a reset connection is its own reason, and the next run reads those shards again (one image per
    shard here, so each URL's retry shows in the server's log)."""
    from prep.testing.servers import serve_images

    with serve_images() as srv:
        gone = [srv.missing(0), srv.failing(410, 0)]
        transient = [srv.flaky(0), srv.failing(500, 1), srv.failing(502, 2), srv.failing(429, 3),
                     srv.reset(4)]
        forbidden = [srv.failing(403, 5)]
        urls = [srv.good(8, 6, 1), *gone, *transient, *forbidden]
        table = tmp_path / "list.jsonl"
        table.write_text("".join(json.dumps({"path": u, "caption": f"c{i}"}) + "\n"
                                 for i, u in enumerate(urls)))
        sets = (f"ingest_local.table={table}", "ingest_local.number_sample_per_shard=1")
        first = run(tmp_path, *sets)
        assert first.ok and first.counts()["samples_out"] == 1
        assert first.dropped() == {"missing_file": 2, "server_error": 4, "connection_error": 1,
                                   "read_error": 1}
        report = [json.loads(line) for line in
                  (tmp_path / "tarfiles_ingested" / ".prep" / il.DROPPED_REPORT).read_text().splitlines()]
        why = {r["path"]: (r["reason"], r["message"]) for r in report}
        assert why[srv.flaky(0)] == ("server_error", f"{srv.flaky(0)}: HTTP 503 Service Unavailable")
        assert why[srv.failing(410, 0)][0] == "missing_file" and "HTTP 410" in why[srv.failing(410, 0)][1]
        assert why[srv.failing(403, 5)][0] == "read_error" and "HTTP 403" in why[srv.failing(403, 5)][1]
        assert any("may pass" in n for n in first.finalize_notes)
        srv.heal()  # every URL above now answers with an image
        before = srv.hits()
        second = run(tmp_path, *sets)
        assert second.ok and second.counts()["samples_out"] == 1 + len(transient)
        assert second.dropped() == {"missing_file": 2, "read_error": 1}
        hits = srv.hits() - before
        assert all(hits[urlsplit(u).path] >= 1 for u in transient)  # retried
        assert not any(hits[urlsplit(u).path] for u in [*gone, *forbidden, urls[0]])  # kept as they were
        assert run(tmp_path, *sets).nothing_to_do


def test_read_failures_are_named_by_what_they_mean(tmp_path: Path) -> None:
    """Real failures from fsspec, urllib and the file system: gone is missing_file, a server's error
    answer, a timeout or a refused connection is one that may pass."""
    import urllib.request

    import fsspec

    from prep.testing.servers import free_port, serve_images

    def failure(read, src: str) -> tuple[str, str]:
        with pytest.raises(Exception) as info:
            read(src)
        return il.read_failure(info.value, src)

    fs = fsspec.filesystem("http")
    with serve_images(slow_seconds=30) as srv:
        assert failure(fs.cat_file, srv.missing(0))[0] == "missing_file"
        url = srv.failing(503, 0)
        assert failure(fs.cat_file, url) == ("server_error", f"{url}: HTTP 503 Service Unavailable")
        assert failure(lambda u: fsspec.open(u).open(), srv.failing(504, 0))[0] == "server_error"  # a cause
        assert failure(urllib.request.urlopen, srv.failing(429, 0))[0] == "server_error"
        assert failure(urllib.request.urlopen, srv.failing(410, 0))[0] == "missing_file"
        assert failure(lambda u: urllib.request.urlopen(u, timeout=0.2), srv.slow(0))[0] == "timeout"
    refused = f"http://127.0.0.1:{free_port()}/x.jpg"
    assert failure(fs.cat_file, refused)[0] == "connection_error"
    # requests (an fsspec backend's or a user's client): its ConnectionError is no builtin one, and its
    # HTTPError carries the status on its response; both are read as the loaders' retries read them
    import requests

    assert failure(requests.get, refused)[0] == "connection_error"
    with serve_images() as srv:
        assert failure(lambda u: requests.get(u).raise_for_status(), srv.failing(503, 1))[0] == "server_error"
    assert failure(open, str(tmp_path / "nope.jpg"))[0] == "missing_file"
    assert failure(open, str(tmp_path))[0] == "read_error"  # a folder


# ---------------------------------------------------------------------------------------- presigned URLs

SECRETS = ("SECRETSIG123", "SECRETCRED456", "SECRETPASS789", "SECRETSIG999", "SECRETPASS000")


def presigned(url: str, sig: str) -> str:
    """`url` with the query of an S3 presigned URL: its signature and credential are secrets."""
    return (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=SECRETCRED456%2F20240101%2Fus-east-1"
            f"%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Signature={sig}")


def leaked(text: str | bytes) -> list[str]:
    """The secrets found in `text` (line wrapping undone: a terminal may break a long word anywhere)."""
    flat = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    flat = "".join(flat.split())
    return [s for s in SECRETS if s in flat]


def leaks_under(folder: Path) -> dict[str, list[str]]:
    """{file: secrets} for every file under `folder`: its bytes, and a parquet's values (compressed pages
    may hide a string from a byte search)."""
    found: dict[str, list[str]] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        hits = leaked(f.read_bytes())
        if f.suffix == ".parquet":
            hits += leaked(json.dumps(pq.read_table(f).to_pylist(), default=str))
        if hits:
            found[str(f.relative_to(folder))] = hits
    return found


def test_read_failures_of_presigned_urls_name_the_url_without_its_secret() -> None:
    """Real failures of presigned URLs (gone, a server error, refused, forbidden, a bad port) and errors
    whose text quotes the URL as libraries do: the message names host and path, never the signature."""
    import aiohttp

    from prep.testing.servers import free_port, serve_images

    with serve_images() as srv:
        cases = [(srv.missing(0), "missing_file"), (srv.failing(503, 0), "server_error"),
                 (srv.failing(403, 0), "read_error"),
                 (f"http://127.0.0.1:{free_port()}/x.jpg", "connection_error")]
        for url, reason in cases:
            signed = presigned(url, "SECRETSIG123")
            with pytest.raises(Exception) as info:
                il._read(signed)
            got, message = il.read_failure(info.value, signed)
            assert got == reason and message.startswith((f"{url}: ", f"{url} does not exist")), message
            assert not leaked(message), message
    bad_port = presigned("http://127.0.0.1:99999/x.jpg", "SECRETSIG123")
    with pytest.raises(ValueError) as port_error:
        il._read(bad_port)
    assert il.read_failure(port_error.value, bad_port) == ("read_error",
                                                           "ValueError: Port out of range 0-65535")
    url = "http://user:SECRETPASS789@Host.Example:8080/a/x.jpg"
    shown = "http://host.example:8080/a/x.jpg"
    for src, err in [(presigned(url, "SECRETSIG123"), OSError(f"cannot open {url}")),
                     (url, aiohttp.InvalidURL(url)),
                     (url, ValueError(f"url=URL('{presigned(url, 'SECRETSIG999')}')"))]:
        reason, message = il.read_failure(err, src)
        assert reason == "read_error" and shown in message and not leaked(message), message


def test_presigned_urls_leave_no_secret_in_outputs_reports_notes_or_errors(tmp_path: Path) -> None:
    """A table of presigned URLs (and one with user:password) through the CLI, with good images and every
    kind of failure: no signature, credential or password in any file the stage writes (tars, parquets,
    report, markers, summary), in stdout/stderr or in an error; the report and notes still name each
    dropped image by host and path with its reason; records and keys of the plain path and the unsigned
    URL stay as written; and the same table signed again gives the same bytes (keys do not depend on the
    signature)."""
    from typer.testing import CliRunner

    from prep.cli import app
    from prep.testing.servers import free_port, serve_files

    served = tmp_path / "served"
    (served / "imgs").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "b.png", "photo", "c.jpg", "plain.jpg")):
        (served / "imgs" / name).write_bytes(make_image(6 + i, 5, "png" if name == "b.png" else "jpeg", i))
    (served / "imgs" / "noise.jpg").write_bytes(CORRUPT_IMAGE)
    (served / "local.png").write_bytes(make_image(4, 4, "png", 9))
    local = tmp_path / "local"
    local.mkdir()
    (local / "local.png").write_bytes((served / "local.png").read_bytes())
    refused = f"http://127.0.0.1:{free_port()}/imgs/refused.jpg"
    with serve_files(served) as srv:
        srv.fail("/imgs/busy.jpg", 503, times=100)
        srv.fail("/imgs/forbidden.jpg", 403, times=100)
        img = f"{srv.url}/imgs"
        drops = {f"{img}/gone.jpg": "missing_file", f"{img}/noise.jpg": "decode_error",
                 f"{img}/forbidden.jpg": "read_error", f"{img}/busy.jpg": "server_error",
                 refused: "connection_error"}

        def rows(sig: str, password: str) -> str:
            with_password = f"{srv.url.replace('//', f'//user:{password}@')}/imgs/c.jpg"
            urls = [presigned(f"{img}/a.jpg", sig), presigned(f"{img}/b.png", sig),
                    presigned(f"{img}/photo", sig), with_password,  # photo: no extension
                    f"{img}/plain.jpg", "local.png", *(presigned(u, sig) for u in drops),
                    presigned(f"{img}/a.jpg", sig + "x")]  # the same object signed again: a duplicate
            return "".join(json.dumps({"path": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls))

        (local / "list.jsonl").write_text(rows("SECRETSIG123", "SECRETPASS789"))
        (served / "list.jsonl").write_text(rows("SECRETSIG999", "SECRETPASS000"))
        runner = CliRunner()
        common = ["run", "ingest_local", "-q", "--set", "ingest_local.number_sample_per_shard=4"]
        first = runner.invoke(app, [*common, "--json", "--set", f"dataset_output_root={tmp_path / 'r1'}",
                                    "--set", f"ingest_local.table={local / 'list.jsonl'}"])
        # the table itself behind a presigned URL, signed otherwise, in the terminal's summary
        table_url = presigned(f"{srv.url}/list.jsonl", "SECRETSIG999")
        second = runner.invoke(app, [*common, "--set", f"dataset_output_root={tmp_path / 'r2'}",
                                     "--set", f"ingest_local.table={table_url}"])
        nope = presigned(f"{srv.url}/nope.jsonl", "SECRETSIG999")
        missing = runner.invoke(app, [*common, "--set", f"dataset_output_root={tmp_path / 'r3'}",
                                      "--set", f"ingest_local.table={nope}"])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    for result in (first, second, missing):
        assert not leaked(result.stdout) and not leaked(result.stderr), result.output
    for root in ("r1", "r2", "r3"):
        assert not leaks_under(tmp_path / root)
    assert missing.exit_code == 1 and f"ingest_local.table {srv.url}/nope.jsonl" in missing.stderr

    doc = json.loads(first.stdout)
    assert doc["counts"]["samples_in"] == 12 and doc["counts"]["samples_out"] == 6
    assert doc["dropped"] == {**Counter(drops.values()), "duplicate_path": 1}
    out = tmp_path / "r1" / "tarfiles_ingested"
    report = [json.loads(line) for line in (out / ".prep" / il.DROPPED_REPORT).read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in report} == {**drops, f"{img}/a.jpg": "duplicate_path"}
    for r in report:  # a read failure's message names what was read (host and path)
        assert r["reason"] == "decode_error" or r["message"].startswith(r["path"]), r
    notes = "\n".join(doc["notes"])
    assert all(f"dropped {u!r} ({why})" in notes for u, why in drops.items()), notes
    samples = shard_samples(out)
    recorded = {json.loads(m["json"])["path"]: k for k, m in samples.items()}
    assert recorded == {p: il.sample_key(f"list/{p}") for p in (
        f"{img}/a.jpg", f"{img}/b.png", f"{img}/photo", f"{img}/c.jpg", f"{img}/plain.jpg", "local.png")}
    assert tree(out) == tree(tmp_path / "r2" / "tarfiles_ingested")  # signed again: the same bytes


def test_a_table_signed_again_reads_nothing_again_and_a_dry_run_shows_no_secret(tmp_path: Path) -> None:
    """Presigned URLs expire, so a table is signed again for the next run: the tasks it finished stay
    done (their fingerprints hold each URL as shown, without its signature), no image is fetched again,
    and a dry run, which hands back every task's payload, shows each URL without its signature."""
    from typer.testing import CliRunner

    from prep.cli import app
    from prep.testing.servers import serve_files

    served = tmp_path / "served"
    (served / "imgs").mkdir(parents=True)
    for i in range(5):
        (served / "imgs" / f"{i}.jpg").write_bytes(make_image(6 + i, 5, "jpeg", i))
    table = tmp_path / "list.jsonl"
    runner = CliRunner()
    args = ["run", "ingest_local", "-q", "--json", "--set", "ingest_local.number_sample_per_shard=2",
            "--set", f"dataset_output_root={tmp_path / 'out'}", "--set", f"ingest_local.table={table}"]
    with serve_files(served) as srv:
        def sign(sig: str) -> None:
            table.write_text("".join(json.dumps({"path": presigned(f"{srv.url}/imgs/{i}.jpg", sig),
                                                 "caption": f"c{i}"}) + "\n" for i in range(5)))

        sign("SECRETSIG123")
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        out = tmp_path / "out" / "tarfiles_ingested"
        before, fetched = tree(out), len(srv.gets(".jpg"))
        assert fetched == 5
        sign("SECRETSIG999")
        settings = [a for a in args[4:] if a != "--set"]
        dry = run_stage("ingest_local", load_config(None, settings), RunOptions(dry_run=True, quiet=True))
        shown = json.dumps([r.data["payload"] for r in dry.results])
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(srv.gets(".jpg")) == fetched  # nothing fetched again
    assert tree(out) == before and json.loads(again.stdout)["counts"]["samples_out"] == 5
    assert f'"{srv.url}/imgs/0.jpg"' in shown and len(dry.results) == 3  # what is read, shown redacted
    assert not leaked(shown + again.stdout + again.stderr)


# -------------------------------------------------------------------------------------- resize and EXIF


def rotated_jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(make_image(width, height, "jpeg", 3)))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=90)
    return buf.getvalue()


@pytest.mark.slow  # img2dataset's import (albumentations) takes seconds
def test_resize_reencode_and_exif_orientation(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "wide.png").write_bytes(make_image(40, 20, "png", 1))
    (folder / "small.png").write_bytes(make_image(8, 6, "png", 2))
    (folder / "turned.jpg").write_bytes(rotated_jpeg(40, 20))  # displayed 20 wide, 40 high
    kept = shard_samples_of(run(tmp_path / "kept", f"ingest_local.input_dir={folder}"), tmp_path / "kept")
    meta = json.loads(kept[il.sample_key("turned.jpg")]["json"])
    assert kept[il.sample_key("turned.jpg")]["jpg"] == (folder / "turned.jpg").read_bytes()
    assert meta["exif_orientation"] == 6 and (meta["original_width"], meta["original_height"]) == (20, 40)
    sets = [f"ingest_local.input_dir={folder}", "ingest_local.resize_mode=keep_ratio",
            "ingest_local.image_size=10", "ingest_local.resize_only_if_bigger=true"]
    resized = shard_samples_of(run(tmp_path / "r", *sets), tmp_path / "r")
    sizes = {k: Image.open(io.BytesIO(m.get("jpg") or m["png"])).size for k, m in resized.items()}
    assert sizes[il.sample_key("wide.png")] == (20, 10) and "jpg" in resized[il.sample_key("wide.png")]
    assert resized[il.sample_key("small.png")]["png"] == (folder / "small.png").read_bytes()  # not bigger
    assert sizes[il.sample_key("turned.jpg")] == (10, 20)  # upright: EXIF applied before the resize
    assert "exif_orientation" not in json.loads(resized[il.sample_key("turned.jpg")]["json"])
    reencoded = run(tmp_path / "e", f"ingest_local.input_dir={folder}", "ingest_local.reencode=true",
                    "ingest_local.encode_format=webp")
    assert reencoded.counts()["reencoded"] == 3
    assert all(set(m) == {"webp", "txt", "json"} for m in shard_samples(tmp_path / "e").values())
    small = run(tmp_path / "f", f"ingest_local.input_dir={folder}", "ingest_local.min_image_size=10")
    assert small.dropped() == {"too_small": 1}
    with pytest.raises(PrepError, match="img2dataset's resizer refuses"):
        run(tmp_path / "g", *sets, "ingest_local.downscale_interpolation=fancy")


def shard_samples_of(result, root: Path) -> dict[str, dict[str, bytes]]:
    assert result.ok, result.to_json()
    return shard_samples(root / "tarfiles_ingested")


# ----------------------------------------------------------------------------------------- kill and resume

KILLER = """
import sys
from pathlib import Path
import prep.stages.ingest_local as il
from prep.formats.atomic import temp_name
after = int(sys.argv.pop(1))
calls = [0]
real = il.write_shard
def stop_here(path, *args, **kw):
    calls[0] += 1
    if calls[0] > after:
        temp_name(Path(path)).write_bytes(b"half a shard")  # as a writer killed mid-write leaves it
        print("stopped", flush=True)
        sys.stdin.read()  # wait here for the SIGKILL
    return real(path, *args, **kw)
il.write_shard = stop_here
sys.argv[0] = "prep"
from prep.cli import main
main()
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prep.cli import app

    image_folder(tmp_path / "imgs")
    args = ["run", "ingest_local", "-q", "--set", f"ingest_local.input_dir={tmp_path / 'imgs'}",
            "--set", "ingest_local.number_sample_per_shard=2"]
    cmd = [sys.executable, "-c", KILLER, "2", *args, "--set", f"dataset_output_root={tmp_path / 'killed'}"]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert line == "stopped\n" and proc.returncode == -signal.SIGKILL, err
    killed = tmp_path / "killed" / "tarfiles_ingested"
    assert len(list(killed.glob("imgs/*.tar"))) == 2 and len(list(killed.glob("imgs/.*.tmp-*"))) == 1
    runner = CliRunner()
    resumed = runner.invoke(app, [*args, "--json", "--set", f"dataset_output_root={tmp_path / 'killed'}"])
    assert resumed.exit_code == 0, resumed.output
    doc = json.loads(resumed.stdout)
    assert (doc["skipped"], doc["done"]) == (2, 2) and doc["counts"]["samples_in"] == 8
    clean = runner.invoke(app, [*args, "--set", f"dataset_output_root={tmp_path / 'clean'}"])
    assert clean.exit_code == 0, clean.output
    assert tree(killed) == tree(tmp_path / "clean" / "tarfiles_ingested") and len(tree(killed)) == 12
    assert not list(killed.rglob(".*.tmp-*"))


# ---------------------------------------------------------------------------------- the stages after it


@pytest.mark.slow  # energon's import alone takes seconds
def test_mixed_formats_through_reorganize_and_wdinfo_load_in_energon_and_prep(tmp_path: Path) -> None:
    from megatron.energon import CaptioningSample, WorkerConfig, get_loader, get_val_dataset

    from prep.loaders import ShardDataset

    good = image_folder(tmp_path / "imgs")
    sets = [f"dataset_output_root={tmp_path}", "download_parquet.enable=false",
            "download_images.enable=false", "ingest_local.enable=true",
            f"ingest_local.input_dir={tmp_path / 'imgs'}", "precache_encodings.enable=false",
            "reorganize_tar.tar_chunk_size=4"]
    cfg = load_config(None, sets)
    assert cfg.reorganize_tar.input_dir == tmp_path / "tarfiles_ingested"
    assert cfg.generate_wdinfo.input_dir == [tmp_path / "tarfiles_reorganized"]
    assert not cfg.merge_source_tar.enable
    for stage in ("ingest_local", "reorganize_tar", "generate_wdinfo"):
        result = run_stage(stage, cfg, RunOptions(quiet=True), QUIET)
        assert result.ok, result.to_json()
        notes = "\n".join(result.to_json()["notes"])
        assert "WARNING" not in notes
    assert "one short last shard" in notes  # 6 samples in shards of 4
    final = tmp_path / "tarfiles_reorganized"
    dataset_yaml = (final / ".nv-meta" / "dataset.yaml").read_text()
    assert "image: jpg,png,webp" in dataset_yaml
    expected = {il.sample_key(rel): (caption or "") for rel, (_, caption) in good.items()}
    assert {s.key for t in final.glob("*.tar") for s in scan_tar(t).samples} == set(expected)
    ds = get_val_dataset(final, split_part="train", batch_size=None,
                         worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0))
    loaded = list(get_loader(ds))
    assert all(isinstance(s, CaptioningSample) and s.image.shape[0] == 3 for s in loaded)
    assert {s.__key__.rsplit("/", 1)[-1]: s.caption for s in loaded} == expected
    prep_ds = ShardDataset(final, batch_size=6, decode="uint8", image_size=8, fields=["jpg|png|webp", "txt"],
                           shuffle=False, rank=0, world_size=1)
    batch = prep_ds.fetch(prep_ds.next_batch(), 0, 1)
    assert tuple(batch["jpg"].shape) == (6, 3, 8, 8)
    assert dict(zip(batch["__key__"], batch["txt"], strict=True)) == expected


# ----------------------------------------------------------------------------------------------- runners


def runs_alike(tmp_path: Path, **opts) -> dict[str, bytes]:
    """The stage's output tree for one way of running it (slices: each run separately, as Slurm would)."""
    folder = tmp_path / "imgs"
    if not folder.exists():
        image_folder(folder)
    name = "-".join(f"{k}{v}" for k, v in opts.items())
    cfg = load_config(None, [f"dataset_output_root={tmp_path / name}", f"ingest_local.input_dir={folder}",
                             "ingest_local.number_sample_per_shard=2"])
    slices = opts.pop("slices", None)
    for index in range(slices or 1):
        sliced = {"task_index": index, "num_tasks": slices} if slices else {}
        result = run_stage("ingest_local", cfg, RunOptions(quiet=True, **opts, **sliced), QUIET)
        assert result.ok and result.finalized == (index == (slices or 1) - 1), result.to_json()
    return tree(tmp_path / name / "tarfiles_ingested") | {
        "report": (tmp_path / name / "tarfiles_ingested" / ".prep" / il.DROPPED_REPORT).read_bytes()}


def test_process_pool_and_slurm_slices_give_the_bytes_of_one_run(tmp_path: Path) -> None:
    one = runs_alike(tmp_path)
    assert len(one) == 4 * 3 + 1
    assert runs_alike(tmp_path, workers=2) == one
    assert runs_alike(tmp_path, slices=3) == one


@pytest.mark.slow
def test_ray_gives_the_bytes_of_one_run(tmp_path: Path) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert runs_alike(tmp_path, runner="ray") == runs_alike(tmp_path)
    finally:
        ray.shutdown()


def test_a_glob_of_tables_naming_the_same_relative_paths(tmp_path: Path) -> None:
    for i, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(make_image(5, 5, "png", i))
        table = pa.table({"path": ["x.png"], "caption": [f"from {name}"]})
        pq.write_table(table, tmp_path / name / f"{name}.parquet")
    result = run(tmp_path / "out", f"ingest_local.table={tmp_path}/*/*.parquet")
    assert result.ok and result.counts()["samples_out"] == 2 and result.counts()["shards"] == 2
    samples = shard_samples(tmp_path / "out" / "tarfiles_ingested")
    assert {m["txt"] for m in samples.values()} == {b"from a", b"from b"}
    parts = (tmp_path / "out" / "tarfiles_ingested").glob("*/00000.tar")
    assert sorted(p.parent.name for p in parts) == ["a", "b"]


@pytest.mark.slow  # torch and a tiny VAE
def test_mixed_formats_through_run_all_with_precache_apart_and_merge(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prep.cli import app
    from prep.loaders import ShardDataset
    from prep.testing.tiny_models import write_tiny_models

    good = image_folder(tmp_path / "imgs")
    write_tiny_models(tmp_path / "models")
    path = tmp_path / "cfg.yaml"  # no folder key but the images: every input follows the enabled stages
    path.write_text(f"""dataset_output_root: {tmp_path / 'data'}
download_parquet: {{enable: false}}
download_images: {{enable: false}}
ingest_local: {{enable: true, input_dir: {tmp_path / 'imgs'}}}
reorganize_tar: {{tar_chunk_size: 4}}
precache_encodings:
  keep_source: false
  device: cpu
  num_workers: 0
  encoders:
    - {{key: vae, modality: image, model: "diffusers:AutoencoderKL", pretrained: {tmp_path / 'models'},
        subfolder: vae, resolution: 16}}
merge_source_tar: {{output_dir: {tmp_path / 'data' / 'merged'}, source_extensions: []}}
""")
    result = CliRunner().invoke(app, ["run", "all", "-c", str(path), "--json"])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [d["stage"] for d in docs] == ["ingest_local", "reorganize_tar", "precache_encodings",
                                          "merge_source_tar", "generate_wdinfo"]
    assert "WARNING" not in json.dumps(docs)
    final = tmp_path / "data" / "merged"
    ds = ShardDataset(final, batch_size=6, decode="raw", fields=["jpg|png|webp", "txt", "vae.npy"],
                      shuffle=False, rank=0, world_size=1)
    batch = ds.fetch(ds.next_batch(), 0, 1)
    expected = {il.sample_key(rel): (data, caption or "") for rel, (data, caption) in good.items()}
    assert {k: (img, txt.decode()) for k, img, txt in zip(batch["__key__"], batch["jpg"], batch["txt"],
                                                           strict=True)} == expected
    assert all(len(v) > 0 for v in batch["vae.npy"])


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of `values` (H x W gray or H x W x 3 colour), written by hand: Pillow writes 16-bit
    gray only."""
    import struct
    import zlib

    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, 0 if values.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_resized_keeps_its_tones(tmp_path: Path, channels: int) -> None:
    """Resizing goes through an 8-bit picture: a 16-bit PNG keeps its tones (img2dataset's OpenCV read
    it as uint16 and its JPEG encode saturated it: the resized image came out white)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    (folder / "wide.png").write_bytes(_png16(ramp if channels == 1 else np.stack([ramp] * 3, -1)))
    sets = [f"ingest_local.input_dir={folder}", "ingest_local.resize_mode=keep_ratio",
            "ingest_local.image_size=16"]
    (sample,) = shard_samples_of(run(tmp_path / "r", *sets), tmp_path / "r").values()
    got = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=float)
    assert got.shape[0] == 16
    assert abs(got.mean() - 127.5) < 8 and got.min() < 40 and got.max() > 215
