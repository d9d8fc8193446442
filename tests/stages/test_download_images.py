"""download_images with real img2dataset against a loopback image server: exact counts per failure
reason, jpg+txt+json per success, keys unique across parts, a killed run resumed without duplicates,
and --retry-failed re-fetching only the failed URLs. Fast unit tests cover the decisions around it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from prep.config import load_config
from prep.errors import PrepError
from prep.formats.tar import scan_tar
from prep.runtime.runner import run_stage
from prep.stages import download_images as di
from prep.stages.base import RunOptions
from prep.testing.servers import make_image, serve_images, url_table

# ------------------------------------------------------------------------------------------- unit tests


def test_reasons_shard_layout_and_prefix():
    assert di.reason_of("HTTP Error 404: Not Found") == "http_404"
    assert di.reason_of("<urlopen error timed out>") == "timeout" and di.reason_of("timed out") == "timeout"
    assert di.reason_of("Image decoding error") == "decode_error"
    assert di.reason_of("Use of image disallowed by X-Robots-Tag directive") == "disallowed_by_x_robots_tag"
    assert di.reason_of("something new") == "other"
    statuses = {"success": 5, "HTTP Error 404: Not Found": 2, "HTTP Error 404: x": 1}
    assert di.reasons(statuses) == {"http_404": 3}
    assert di.shard_layout(2500, 1000, True) == (3, 834) and di.shard_layout(2500, 1000, False) == (3, 1000)
    assert di.shard_layout(0, 1000, True)[0] == 0 and di.shard_layout(1000, 1000, True) == (1, 1000)
    assert di.key_prefix("data__train-00000.part3") == "data__train-00000_part3"


def _fake_i2d_shard(folder: Path, name: str, keys: list[str], captions: list[str]) -> None:
    """A shard shaped exactly as img2dataset's webdataset writer leaves it (webdataset TarWriter)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with wds.TarWriter(str(folder / f"{name}.tar")) as w:
        for i, (k, c) in enumerate(zip(keys, captions, strict=True)):
            meta = {"caption": c, "url": f"http://x/{k}", "key": k, "status": "success",
                    "error_message": None}
            w.write({"__key__": k, "jpg": make_image(8, 8, "jpeg", i), "txt": c,
                     "json": json.dumps(meta, indent=4)})
            rows.append(meta)
    # img2dataset's parquet is in completion order, not key order
    pq.write_table(pa.Table.from_pylist(list(reversed(rows))), folder / f"{name}.parquet")
    stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 0.1, "status_dict": {"success": len(keys)}}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats))


def test_publish_prefixes_keys_everywhere_and_is_byte_stable(tmp_path):
    keys = ["000000", "000001", "000002"]
    for part in ("a.part0", "a.part1"):
        _fake_i2d_shard(tmp_path / "stage" / part, "00000", keys, [f"{part} {k}" for k in keys])
    facts = {}
    for part in ("a.part0", "a.part1"):
        facts[part] = di.publish_shard(tmp_path / "stage" / part, tmp_path / "out" / part, "00000",
                                       di.key_prefix(part))
    seen = []
    for part in ("a.part0", "a.part1"):
        tar = tmp_path / "out" / part / "00000.tar"
        scan = scan_tar(tar)
        seen += [s.key for s in scan.samples]
        assert all(set(s.members) == {"jpg", "txt", "json"} for s in scan.samples)
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            assert json.loads(sample["json"])["key"] == sample["__key__"]
        table = pq.read_table(tmp_path / "out" / part / "00000.parquet")
        assert table["key"].to_pylist() == [s.key for s in scan.samples]  # prefixed and sorted
        assert not (tmp_path / "stage" / part / "00000.tar").exists()  # staging tar gone, stats kept
        assert (tmp_path / "stage" / part / "00000_stats.json").exists()
    assert len(seen) == len(set(seen)) == 6 and seen[0] == "a_part0_000000"
    # publishing the same img2dataset output again gives the same bytes
    _fake_i2d_shard(tmp_path / "again", "00000", keys, [f"a.part0 {k}" for k in keys])
    again = di.publish_shard(tmp_path / "again", tmp_path / "out2", "00000", "a_part0")
    assert again["checksum"] == facts["a.part0"]["checksum"]


def _cfg(root: Path, inp: Path, *extra: str):
    return load_config(None, [f"dataset_output_root={root}", f"download_images.input_dir={inp}",
                              "download_images.download_num_processes=1",
                              "download_images.download_num_threads=8", "download_images.timeout=1", *extra])


def test_config_errors_come_before_any_download(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["c"]}), inp / "p.part0.parquet")
    with pytest.raises(PrepError, match=r"'URL', 'TEXT' not found; the file has: 'url', 'caption'"):
        run_stage("download_images", _cfg(tmp_path, inp), RunOptions(quiet=True))
    ok = ["download_images.url_col=url", "download_images.caption_col=caption"]
    with pytest.raises(PrepError, match="pip install pyspark"):
        run_stage("download_images", _cfg(tmp_path, inp, *ok, "download_images.distributor=pyspark"),
                  RunOptions(quiet=True))
    with pytest.raises(PrepError, match="output_folder"):
        run_stage("download_images", _cfg(tmp_path, inp, *ok,
                                          "download_images.img2dataset_additional_arguments.output_folder=/x"),
                  RunOptions(quiet=True))
    with pytest.raises(PrepError, match="resize_mode set both"):
        run_stage("download_images", _cfg(tmp_path, inp, *ok, "download_images.resize_mode=border",
                                          "download_images.img2dataset_additional_arguments.resize_mode=no"),
                  RunOptions(quiet=True))
    assert not (tmp_path / "tarfiles_raw" / "p.part0").exists()


def test_a_shard_img2dataset_leaves_unfinished_fails_the_task(tmp_path, monkeypatch):
    """img2dataset only prints when a shard raises and returns normally: prep must fail the task."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(url_table([(f"http://x/{i}.jpg", f"c{i}") for i in range(4)]), inp / "p.part0.parquet")

    def finishes_only_shard_0(url_list, output_folder, args, where):
        _fake_i2d_shard(output_folder, "00000", ["000", "001"], ["c0", "c1"])

    monkeypatch.setattr(di, "call_img2dataset", finishes_only_shard_0)
    cfg = _cfg(tmp_path, inp, "download_images.number_sample_per_shard=2")
    run = run_stage("download_images", cfg, RunOptions(quiet=True))
    assert not run.ok and "did not finish shard(s) 00001 of 2 (published 1)" in run.to_json()["errors"][0]
    assert (tmp_path / "tarfiles_raw" / "p.part0" / "00000.tar").exists()  # finished work is kept
    assert not list((tmp_path / "tarfiles_raw" / ".prep" / "done" / "download_images").glob("*.json"))


# ------------------------------------------------------------------------------ real img2dataset, loopback

# 24 rows in 3 balanced shards of 8: shard 0 is all good (fast), shard 2 holds the slow URLs, so a run
# is still busy after shard 0 is finished and can be killed there.
FAILING = ("missing", "corrupt", "noai", "flaky", "slow")
EXPECTED_FAILS = {"http_404": 3, "decode_error": 2, "disallowed_by_x_robots_tag": 1, "http_503": 2,
                  "timeout": 2}


def _rows(srv) -> list[tuple[str, str]]:
    sizes = [(64, 48), (128, 96), (96, 160), (200, 200)]
    rows = [(srv.good(*sizes[i % 4], i, "png" if i == 3 else "jpg"), f"good {i}") for i in range(8)]
    rows += [(srv.good(80, 80, 10 + i), f"good {8 + i}") for i in range(3)]
    rows += [(srv.missing(i), f"missing {i}") for i in range(3)]
    rows += [(srv.corrupt(i), f"corrupt {i}") for i in range(2)]
    rows += [(srv.redirect(72, 72, 500 + i), f"redirect {i}") for i in range(2)] + [(srv.noai(0), "noai 0")]
    rows += [(srv.flaky(i), f"flaky {i}") for i in range(2)] + [(srv.slow(i), f"slow {i}") for i in range(2)]
    rows += [(srv.good(50, 70, 99), "good 11")]
    return rows


def _settings(root: Path, inp: Path) -> list[str]:
    return [f"dataset_output_root={root}", f"download_images.input_dir={inp}",
            "download_images.download_num_processes=1", "download_images.download_num_threads=8",
            "download_images.timeout=1", "download_images.number_sample_per_shard=8"]


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """Kill `prep run download_images` (SIGKILL, whole process group) once img2dataset has finished
    shard 0, then resume it in-process."""
    root = tmp_path_factory.mktemp("dl")
    inp = root / "parquet"
    inp.mkdir()
    with serve_images(slow_seconds=3) as srv:
        rows = _rows(srv)
        pq.write_table(url_table(rows), inp / "laion.part0.parquet")
        settings = _settings(root, inp)
        cmd = [sys.executable, "-m", "prep.cli", "run", "download_images", "--quiet"]
        for s in settings:
            cmd += ["--set", s]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        shard0 = root / "tarfiles_raw" / ".prep" / "img2dataset" / "laion.part0" / "00000_stats.json"
        deadline = time.monotonic() + 240
        while not shard0.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for a condition, not papering over a race
        assert shard0.exists() and proc.poll() is None, "the run ended before shard 0 was observed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hits_killed = srv.hits()
        left = sorted(p.name for p in (root / "tarfiles_raw").glob("laion.part0/*")
                      if not p.name.startswith("."))
        run = run_stage("download_images", load_config(None, settings), RunOptions(quiet=True))
        yield {"root": root, "rows": rows, "srv": srv, "run": run, "hits_killed": hits_killed,
               "hits": srv.hits(), "left_after_kill": left, "settings": settings}


@pytest.mark.slow
def test_img2dataset_progress_bars_stay_out_of_prep_output(tmp_path, capfd):
    inp = tmp_path / "parquet"
    inp.mkdir()
    with serve_images(slow_seconds=0) as srv:
        rows = [(srv.good(16, 16, i), f"good {i}") for i in range(3)] + [(srv.missing(0), "gone")]
        pq.write_table(url_table(rows), inp / "p.part0.parquet")
        cfg = load_config(None, _settings(tmp_path, inp))
        run = run_stage("download_images", cfg, RunOptions(quiet=True))
    assert run.ok and run.counts()["samples_out"] == 3
    out, err = capfd.readouterr()
    assert not di._BAR.search(out + err), f"a tqdm bar reached prep's output: {err!r}"
    log = (tmp_path / "tarfiles_raw" / ".prep" / "img2dataset" / "p.part0.log").read_text()
    assert di._BAR.search(log), "the bar goes to img2dataset's log"


@pytest.mark.slow
def test_summary_names_each_failure_once(killed_then_resumed):
    from rich.console import Console

    from prep.runtime.summary import print_summary

    run = killed_then_resumed["run"]
    console = Console(record=True, width=200)
    print_summary(run, console)
    text = console.export_text()
    doc = run.to_json()
    assert not [k for k in doc["counts"] if k.startswith("failed")], "img2dataset's buckets repeat reasons"
    for reason, n in EXPECTED_FAILS.items():
        assert text.count(reason) == 1, f"{reason} is listed {text.count(reason)} times"
        assert f"dropped: {reason}" in text and f"{n:,} ({100 * n / 24:.1f}%)" in text


@pytest.mark.slow
def test_killed_run_resumes_with_exact_counts_and_no_duplicates(killed_then_resumed):
    k = killed_then_resumed
    doc = k["run"].to_json()
    assert doc["ok"], doc["errors"]
    left = k["left_after_kill"]  # a shard counts as published only with its stats, written last
    assert all({f"{n[:5]}.tar", f"{n[:5]}.parquet"} <= set(left) for n in left if n.endswith("_stats.json"))
    assert doc["counts"]["samples_in"] == 24 and doc["counts"]["samples_out"] == 14
    assert doc["dropped"] == EXPECTED_FAILS
    assert doc["counts"]["shards"] == 3
    # shard 0's URLs were fetched by the killed run only, never again
    for url, _ in k["rows"][:8]:
        path = "/" + url.split("/", 3)[3]
        assert k["hits_killed"][path] == 1 and k["hits"][path] == 1, path
    final = k["root"] / "tarfiles_raw" / "laion.part0"
    keys, captions = [], []
    for n in ("00000", "00001", "00002"):
        scan = scan_tar(final / f"{n}.tar")
        stats = json.loads((final / f"{n}_stats.json").read_text())
        assert len(scan.samples) == stats["successes"]
        for sample in wds.WebDataset(str(final / f"{n}.tar"), shardshuffle=False):
            assert {"jpg", "txt", "json"} <= set(sample), sample["__key__"]
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"] and meta["status"] == "success"
            assert meta["caption"] == sample["txt"].decode()
            keys.append(sample["__key__"])
            captions.append(sample["txt"].decode())
    assert len(keys) == len(set(keys)) == 14 and all(k.startswith("laion_part0_") for k in keys)
    table = pa.concat_tables([pq.read_table(final / f"{n}.parquet") for n in ("00000", "00001", "00002")])
    assert table.num_rows == 24 and len(set(table["key"].to_pylist())) == 24  # every row once
    assert sorted(captions) == sorted(c for _, c in k["rows"] if not c.startswith(FAILING))


@pytest.mark.slow
def test_retry_failed_refetches_only_failed_urls_and_keeps_keys(killed_then_resumed):
    k = killed_then_resumed
    srv, root = k["srv"], k["root"]
    final = root / "tarfiles_raw" / "laion.part0"
    before = srv.hits()
    old = pq.read_table(final / "00002.parquet")
    flaky_keys = [key for key, url in zip(old["key"].to_pylist(), old["url"].to_pylist(), strict=True)
                  if "/flaky/" in url]
    srv.heal()
    run = run_stage("download_images", load_config(None, k["settings"]),
                    RunOptions(quiet=True, retry_failed=True))
    doc = run.to_json()
    assert doc["ok"], doc["errors"]
    assert doc["counts"]["retried"] == 10 and doc["counts"]["recovered"] == 2
    assert doc["counts"]["samples_out"] == 16 and "http_503" not in doc["dropped"]
    fetched = srv.hits() - before
    failed_paths = {"/" + u.split("/", 3)[3] for u, c in k["rows"] if c.startswith(FAILING)}
    assert set(fetched) == failed_paths  # only the failed URLs, every one of them
    scan = scan_tar(final / "00002.tar")
    assert set(flaky_keys) <= {s.key for s in scan.samples}  # recovered under their original keys
    keys = [s.key for n in ("00000", "00001", "00002") for s in scan_tar(final / f"{n}.tar").samples]
    assert len(keys) == len(set(keys)) == 16
    new = pq.read_table(final / "00002.parquet")
    successes = Counter(new["status"].to_pylist())["success"]
    assert new.num_rows == old.num_rows and successes == Counter(old["status"].to_pylist())["success"] + 2
    # a plain re-run afterwards downloads nothing and reports the same totals
    hits = srv.hits()
    again = run_stage("download_images", load_config(None, k["settings"]), RunOptions(quiet=True)).to_json()
    assert again["ok"] and again["counts"]["samples_out"] == 16 and srv.hits() == hits


@pytest.mark.slow
def test_row_of_inverts_img2dataset_keys():
    from img2dataset.downloader import compute_key

    for per in (1, 7, 8, 10, 834, 1000):
        for row in (0, per - 1, per, 3 * per + 2):
            shard, index = divmod(row, per)
            key = compute_key(index, shard, math.ceil(math.log10(per)), 5)
            assert di.row_of(key, per) == row



def test_resume_keeps_shards_unless_the_part_or_shaping_settings_change(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    part = inp / "p.part0.parquet"
    pq.write_table(url_table([(f"http://x/{i}.jpg", f"c{i}") for i in range(4)]), part)
    calls: list[Path] = []

    def finishes_everything(url_list, output_folder, args, where):
        calls.append(url_list)
        for n in ("00000", "00001"):
            if not (output_folder / f"{n}_stats.json").exists():  # img2dataset's incremental mode
                _fake_i2d_shard(output_folder, n, ["0", "1"], [f"{n} a", f"{n} b"])

    monkeypatch.setattr(di, "call_img2dataset", finishes_everything)
    base = ["download_images.number_sample_per_shard=2"]
    assert run_stage("download_images", _cfg(tmp_path, inp, *base), RunOptions(quiet=True)).ok
    assert len(calls) == 1
    # other threads only: the task re-runs (new fingerprint) but nothing is downloaded again
    run = run_stage("download_images", _cfg(tmp_path, inp, *base, "download_images.download_num_threads=3"),
                    RunOptions(quiet=True))
    assert run.ok and len(calls) == 1 and run.counts()["shards_downloaded_now"] == 0
    # another resize mode changes what shards hold: the part starts over
    run = run_stage("download_images", _cfg(tmp_path, inp, *base, "download_images.resize_mode=border"),
                    RunOptions(quiet=True))
    assert run.ok and len(calls) == 2 and run.counts()["shards_downloaded_now"] == 2
    assert "downloaded again" in run.to_json()["notes"][0]


def test_a_part_folder_no_longer_planned_is_named(tmp_path, monkeypatch):
    """Its tars would join reorganize_tar's input beside the current parts (a part removed by a re-split
    holds rows the other parts now hold too): the summary names it."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(2):
        pq.write_table(url_table([(f"http://x/{k}/{i}.jpg", f"c{i}") for i in range(2)]),
                       inp / f"p.part{k}.parquet")

    def finishes_everything(url_list, output_folder, args, where):
        _fake_i2d_shard(output_folder, "00000", ["0", "1"], ["a", "b"])

    monkeypatch.setattr(di, "call_img2dataset", finishes_everything)
    first = run_stage("download_images", _cfg(tmp_path, inp), RunOptions(quiet=True))
    assert first.ok and not any("WARNING" in n for n in first.finalize_notes)
    (inp / "p.part1.parquet").unlink()
    again = run_stage("download_images", _cfg(tmp_path, inp), RunOptions(quiet=True))
    assert again.ok
    assert any(n.startswith("WARNING") and "tars in p.part1," in n for n in again.finalize_notes)


def test_a_published_shard_lost_later_is_downloaded_again(tmp_path, monkeypatch):
    """img2dataset skips a shard whose stats are staged; prep keeps them after publishing. A shard lost
    from output_dir afterwards (a bad disk, deleted by hand) must come back on a re-run, not fail it
    with "did not finish" on every re-run."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(url_table([(f"http://x/{i}.jpg", f"c{i}") for i in range(4)]), inp / "p.part0.parquet")

    def incremental(url_list, output_folder, args, where):
        for n in ("00000", "00001"):
            if not (output_folder / f"{n}_stats.json").exists():  # img2dataset's incremental mode
                _fake_i2d_shard(output_folder, n, ["0", "1"], [f"{n} a", f"{n} b"])

    monkeypatch.setattr(di, "call_img2dataset", incremental)
    cfg = _cfg(tmp_path, inp, "download_images.number_sample_per_shard=2")
    assert run_stage("download_images", cfg, RunOptions(quiet=True)).ok
    lost = tmp_path / "tarfiles_raw" / "p.part0" / "00001.tar"
    before = lost.read_bytes()
    lost.unlink()
    again = run_stage("download_images", cfg, RunOptions(quiet=True))
    assert again.ok, again.to_json()["errors"]
    assert again.counts()["shards_downloaded_now"] == 1 and lost.read_bytes() == before
    cut = lost.with_name("00000_stats.json")  # a stats file cut short: named, with how to get it back
    cut.write_text(cut.read_text()[:20])
    failed = run_stage("download_images", cfg, RunOptions(quiet=True, force=True))
    assert not failed.ok and f"{cut}: img2dataset's shard stats are not JSON" in failed.failed[0].error
    for suffix in (".tar", ".parquet", "_stats.json"):
        cut.with_name(f"00000{suffix}").unlink()
    assert run_stage("download_images", cfg, RunOptions(quiet=True)).ok and cut.exists()


def test_a_stats_file_a_kill_cut_is_fetched_again(tmp_path):
    """img2dataset opens a shard's stats file, then fills it: a kill in between leaves it empty. The
    re-run must fetch that shard again (img2dataset's incremental mode would skip it, and publishing
    it would fail on the empty stats), and end as a run never killed."""
    inp = tmp_path / "parquet"
    inp.mkdir()
    with serve_images(slow_seconds=0) as srv:
        rows = [(srv.good(16, 16, i), f"good {i}") for i in range(5)]
        pq.write_table(url_table(rows), inp / "p.part0.parquet")
        settings = [*_settings(tmp_path, inp)[:-1], "download_images.number_sample_per_shard=3"]
        clean = run_stage("download_images", load_config(None, [*settings[1:],
                          f"dataset_output_root={tmp_path / 'clean'}"]), RunOptions(quiet=True))
        assert clean.ok
        first = run_stage("download_images", load_config(None, settings), RunOptions(quiet=True))
        assert first.ok
        final = tmp_path / "tarfiles_raw" / "p.part0"
        staging = tmp_path / "tarfiles_raw" / ".prep" / "img2dataset" / "p.part0"
        # the state a kill leaves: shard 0 unpublished, its staged tar there, its stats opened but empty
        for suffix in (".tar", ".parquet", "_stats.json"):
            (final / f"00000{suffix}").unlink()
        (staging / "00000.tar").write_bytes(b"")
        (staging / "00000_stats.json").write_text("")
        again = run_stage("download_images", load_config(None, settings), RunOptions(quiet=True))
    assert again.ok, again.to_json()["errors"]
    want = tmp_path / "clean" / "tarfiles_raw" / "p.part0"
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in want.iterdir())
    assert (final / "00000.tar").read_bytes() == (want / "00000.tar").read_bytes()


@pytest.mark.slow
def test_presigned_image_urls_leave_no_credential_in_any_file_the_stages_write(tmp_path):
    """A table of presigned image URLs (S3's X-Amz-*, a SAS sig, a token): download_images, its
    --retry-failed, then reorganize_tar write no file that holds a credential (shards' json, parquet,
    stats, img2dataset's staging and log, markers), while each recorded `url` is the URL as written
    with only the credentials' values replaced, innocent parameters kept byte for byte."""
    from prep.formats.urls import scrub_url

    secret = "SIGSECRET0123"
    presign = f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID{secret}&X-Amz-Signature={secret}&w=1"
    inp = tmp_path / "parquet"
    inp.mkdir()
    with serve_images(slow_seconds=0) as srv:
        rows = [(srv.good(16, 16, i) + presign, f"signed {i}") for i in range(3)]
        rows += [(srv.good(16, 16, 9) + f"?sv=2020&sig={secret}", "sas"),
                 (srv.good(16, 16, 8) + "?v=2", "plain")]
        rows += [(srv.missing(0) + f"?token={secret}", "gone"), (srv.flaky(0) + presign, "flaky")]
        pq.write_table(url_table(rows), inp / "p.part0.parquet")
        settings = _settings(tmp_path, inp)
        first = run_stage("download_images", load_config(None, settings), RunOptions(quiet=True)).to_json()
        assert first["ok"] and first["counts"]["samples_out"] == 5, first
        srv.heal()
        retried = run_stage("download_images", load_config(None, settings),
                            RunOptions(quiet=True, retry_failed=True)).to_json()
        assert retried["ok"] and retried["counts"]["recovered"] == 1, retried
    out = tmp_path / "shards"
    reorganize = [f"reorganize_tar.input_dir={tmp_path / 'tarfiles_raw'}", f"reorganize_tar.output_dir={out}",
                  "reorganize_tar.tar_chunk_size=3"]
    reorganized = run_stage("reorganize_tar", load_config(None, [*settings, *reorganize]),
                            RunOptions(quiet=True)).to_json()
    assert reorganized["ok"], reorganized
    written = [p for p in tmp_path.rglob("*") if p.is_file() and inp not in p.parents]
    assert len(written) > 10
    assert not [str(p) for p in written if secret.encode() in p.read_bytes()]
    recorded = {json.loads(s["json"])["caption"]: json.loads(s["json"])["url"]
                for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)}
    assert recorded == {c: scrub_url(u) for u, c in rows if c != "gone"}
    assert recorded["plain"] == srv.good(16, 16, 8) + "?v=2" and recorded["signed 0"].endswith("&w=1")
    urls = [u for p in (tmp_path / "tarfiles_raw" / "p.part0").glob("*.parquet")
            for u in pq.read_table(p)["url"].to_pylist()]
    assert sorted(urls) == sorted(scrub_url(u) for u, _ in rows)
