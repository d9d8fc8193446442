"""merge_source_tar: precached shards (only KEY.<enc>.npy members) joined with their source shards of the
same relative name, in place or to output_dir, sorted, atomic, reported, idempotent, kill-safe."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from prep.config import load_config
from prep.formats.checksum import file_checksum
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.formats.tar_write import write_shard
from prep.runtime.runner import run_stage
from prep.stages import merge_source_tar as ms
from prep.stages.base import RunOptions
from prep.verify import verify_folder

LAYOUT = ["000000.tar", "000001.tar", "nested/000002.tar"]


def npy(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).standard_normal((4, 8, 8)).astype(np.float16)
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def make_dataset(root: Path) -> tuple[Path, Path, dict[str, dict[str, bytes]]]:
    """Source shards (jpg/txt/json, one sample without json) and precached shards holding only vae.npy,
    with one precached key that has no source. Returns (precached, source, expected merged samples)."""
    src, pre = root / "source", root / "precached"
    expected: dict[str, dict[str, bytes]] = {}
    for s, rel in enumerate(LAYOUT):
        source_samples, pre_samples = [], []
        for i in range(6):
            key = f"{s:02d}{i:04d}"
            members = {"jpg": bytes([s, i]) * (50 + i), "txt": f"caption {key}".encode(),
                       "json": json.dumps({"key": key}).encode()}
            if (s, i) == (1, 3):
                del members["json"]
            source_samples.append((key, members))
            if i != 5:  # precache dropped one sample: its source goes unused
                pre_samples.append((key, {"vae.npy": npy(s * 10 + i)}))
                expected[key] = {**members, "vae.npy": npy(s * 10 + i)}
        if s == 2:
            pre_samples.append(("zz-lost", {"vae.npy": npy(99)}))
            expected["zz-lost"] = {"vae.npy": npy(99)}
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (pre / rel).parent.mkdir(parents=True, exist_ok=True)
        write_shard(src / rel, source_samples, fsync=False)
        write_shard(pre / rel, pre_samples, fsync=False)
    write_manifest(pre, Manifest([ShardEntry(r, 5, 0, "") for r in LAYOUT], {"vae.npy": {"dtype": "float16",
                   "shape": [4, 8, 8]}}, {"vae": {"class": "AutoencoderKL", "scale": 0.18}},
                   [{"stage": "precache_encodings"}], 6))
    return pre, src, expected


def config(pre: Path, src: Path, out: Path | None = None, **sets):
    over = [f"merge_source_tar.input_dir={pre}", f"merge_source_tar.source_dir={src}"]
    if out is not None:
        over.append(f"merge_source_tar.output_dir={out}")
    return load_config(None, over + [f"merge_source_tar.{k}={v}" for k, v in sets.items()])


def run(pre: Path, src: Path, out: Path | None = None, force: bool = False, **sets):
    return run_stage(ms.NAME, config(pre, src, out, **sets), RunOptions(quiet=True, force=force))


def read_all(folder: Path) -> dict[str, dict[str, bytes]]:
    got: dict[str, dict[str, bytes]] = {}
    for rel in LAYOUT:
        with tarfile.open(folder / rel) as tf:
            names = tf.getnames()
            assert names == sorted(names, key=lambda n: (n.split(".", 1)[0], n.split(".", 1)[1]))
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                got.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return got


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in LAYOUT} | {
        rel + ".idx": (folder / (rel + ".idx")).read_bytes() for rel in LAYOUT} | {
        "manifest.json": (folder / "manifest.json").read_bytes()}


def test_in_place_merge_joins_sorts_reports_and_is_idempotent(tmp_path):
    pre, src, expected = make_dataset(tmp_path)
    result = run(pre, src)
    assert result.ok and result.finalized, result.to_json()
    assert read_all(pre) == expected
    counts = result.counts()
    assert counts["keys_without_source"] == 1 and counts["source_samples_unused"] == 3
    assert counts["source_members_missing"] == 1  # the one source sample without .json
    assert counts["members_appended"] == 15 * 3 - 1
    notes = "\n".join(result.to_json()["notes"])
    assert "nested/000002.tar: 1 key(s) found no source sample: zz-lost" in notes
    assert "000001.tar: 1 source sample(s) have no .json" in notes
    report = (pre / ".prep" / ms.NO_SOURCE_REPORT).read_text().splitlines()
    assert [json.loads(x) for x in report] == [{"shard": "nested/000002.tar", "key": "zz-lost"}]
    assert all(not c.problems for c in verify_folder(pre))
    m = read_manifest(pre)
    assert m.encoders == {"vae": {"class": "AutoencoderKL", "scale": 0.18}}
    assert m.fields["vae.npy"] == {"dtype": "float16", "shape": [4, 8, 8], "samples": 16}
    assert m.fields["jpg"] == {"samples": 15} and m.chunk_size == 6
    assert [h["stage"] for h in m.history] == ["precache_encodings", "merge_source_tar"]

    first = shard_bytes(pre)
    again = run(pre, src)
    assert {r.status for r in again.results} == {"skipped"} and shard_bytes(pre) == first
    forced = run(pre, src, force=True)  # merging an already merged shard changes nothing
    assert forced.ok and forced.counts()["members_appended"] == 0 and shard_bytes(pre) == first


def test_a_source_shard_without_a_precached_one_is_named(tmp_path):
    """Precache failed on (or never reached) a shard: the merged output silently lacking a whole shard's
    samples would be off from reorganize_tar's counts, so the summary names it."""
    pre, src, _ = make_dataset(tmp_path)
    (pre / "000001.tar").unlink()
    (pre / "000001.tar.idx").unlink(missing_ok=True)
    result = run(pre, src, tmp_path / "merged")
    assert result.ok
    notes = "\n".join(result.finalize_notes)
    assert "WARNING: 1 source shard(s) have no precached shard" in notes and "(first: 000001.tar)" in notes
    assert not any("WARNING: 1 source" in n for n in run(*make_dataset(tmp_path / "b")[:2]).finalize_notes)


def test_output_dir_leaves_inputs_untouched_and_matches_in_place(tmp_path):
    pre, src, expected = make_dataset(tmp_path / "a")
    before = {p: file_checksum(p) for p in sorted(pre.rglob("*.tar")) + sorted(src.rglob("*.tar"))}
    out = tmp_path / "merged"
    assert run(pre, src, out).ok
    assert {p: file_checksum(p) for p in before} == before
    assert read_all(out) == expected
    pre_b, src_b, _ = make_dataset(tmp_path / "b")
    assert run(pre_b, src_b).ok
    assert all((out / rel).read_bytes() == (pre_b / rel).read_bytes() for rel in LAYOUT)


def test_an_output_dir_inside_input_dir_is_not_read_as_input(tmp_path):
    """Its own shards are not the stage's input: a re-run (forced too) merges the same shards, not its
    output again (that doubled every sample), and writes the same bytes."""
    pre, src, expected = make_dataset(tmp_path)
    out = pre / "merged"
    assert run(pre, src, out).ok and read_all(out) == expected
    first = shard_bytes(out)
    assert run(pre, src, out, force=True).ok
    assert shard_bytes(out) == first and not (out / "merged").exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(LAYOUT)


def test_strict_fails_naming_the_key_and_empty_list_takes_every_member(tmp_path):
    pre, src, expected = make_dataset(tmp_path)
    result = run(pre, src, tmp_path / "out", strict="true")
    assert not result.ok and "found no source sample (first: nested/000002.tar:zz-lost)" in result.errors[0]
    result = run(pre, src, tmp_path / "out2", source_extensions="[txt]")
    assert result.ok
    got = read_all(tmp_path / "out2")
    assert got["000000"] == {"txt": expected["000000"]["txt"], "vae.npy": expected["000000"]["vae.npy"]}
    assert run(pre, src, tmp_path / "out3", source_extensions="[]").ok
    assert read_all(tmp_path / "out3") == expected


_KILLER = r"""
import os, signal, sys
import prep.formats.tar_write as tar_mod
from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

n, pre, src = int(sys.argv[1]), sys.argv[2], sys.argv[3]
calls = [0]
real = tar_mod._BlockSink.flush

def flush(sink, *a, **k):  # killed at the n-th block write of shard 000001's rewrite
    if ".000001.tar.tmp" in str(sink.f.name):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(sink, *a, **k)

tar_mod.WRITE_BLOCK = 1024  # many block writes per shard, so a kill can land inside one
tar_mod._BlockSink.flush = flush
cfg = load_config(None, [f"merge_source_tar.input_dir={pre}", f"merge_source_tar.source_dir={src}"])
sys.exit(0 if run_stage("merge_source_tar", cfg, RunOptions(quiet=True)).ok else 1)
"""


@pytest.mark.slow
def test_kill_9_during_in_place_rewrite_keeps_input_and_rerun_matches(tmp_path):
    pre, src, _ = make_dataset(tmp_path / "a")
    ref_pre, ref_src, _ = make_dataset(tmp_path / "b")
    assert run(ref_pre, ref_src).ok
    original = (pre / "000001.tar").read_bytes()
    killer = [sys.executable, "-c", _KILLER]
    proc = subprocess.run([*killer, "3", str(pre), str(src)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (pre / "000001.tar").read_bytes() == original  # killed mid-rewrite: input intact
    assert any(pre.glob(".000001.tar.tmp-*"))
    proc = subprocess.run([*killer, "0", str(pre), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shard_bytes(pre) == shard_bytes(ref_pre)
    assert not any(pre.rglob(".*tmp*"))
