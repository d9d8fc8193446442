"""reorganize_tar on 30 uneven real tars: exact accounting, equal shards, identical bytes across worker
counts and across kill -9 / re-run, damaged inputs, duplicate keys, img2dataset stats, tail policies."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prep.formats.tar_write as tar_mod
from prep.config import load_config
from prep.errors import PrepError
from prep.formats.manifest import read_manifest
from prep.formats.tar import scan_tar
from prep.runtime.runner import run_stage
from prep.stages import reorganize_tar as rt
from prep.stages.base import RunOptions
from prep.verify import verify_folder

CHUNK = 100
N_TARS = 30


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[tuple[str, int]]:
    """A tar as img2dataset leaves it (webdataset/tarfile headers); returns (key, jpg data offset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [(m.name.split(".")[0], m.offset_data) for m in tf.getmembers() if m.name.endswith(".jpg")]


def make_inputs(root: Path, seed: int = 0) -> dict[str, dict[str, dict[str, bytes]]]:
    """30 tars in 3 part folders, 0..137 samples each (first empty, one full 137), ~8% missing their txt,
    half written out of key order, and one truncated inside a sample. Returns the expected usable
    samples: {key: {ext: bytes}} per tar relative path, after damage and the jpg+txt requirement."""
    rng = random.Random(seed)
    counts = [0, 137] + [rng.randint(0, 137) for _ in range(N_TARS - 2)]
    expected: dict[str, dict[str, dict[str, bytes]]] = {}
    for t, n in enumerate(counts):
        rel = f"part{t // 10}/{t % 10:05d}.tar"
        samples = []
        for i in range(n):
            key = f"{t:03d}{i:06d}"
            members = {"jpg": rng.randbytes(rng.randint(100, 2500)),
                       "json": json.dumps({"key": key, "n": i}).encode()}
            if rng.random() > 0.08:
                members["txt"] = f"caption {key} {rng.random()}".encode()
            samples.append((key, members))
        if t % 2:
            rng.shuffle(samples)
        jpg_at = _write_tar(root / rel, samples)
        kept = samples
        if t == 17:  # truncated in the middle of a sample's image
            cut = len(samples) * 2 // 3
            with open(root / rel, "r+b") as f:
                f.truncate(jpg_at[cut][1] + 50)
            kept = samples[:cut]
        expected[rel] = {k: m for k, m in kept if "txt" in m}
    return expected


def config(inp: Path, out: Path, **sets):
    over = [f"reorganize_tar.input_dir={inp}", f"reorganize_tar.output_dir={out}",
            f"reorganize_tar.tar_chunk_size={CHUNK}", "reorganize_tar.file_ext_in_tar=[jpg, txt]",
            "reorganize_tar.keep_other_members=true"]
    over += [f"reorganize_tar.{k}={v}" for k, v in sets.items()]
    return load_config(None, over)


def run(inp: Path, out: Path, workers: int = 1, **sets):
    return run_stage(rt.NAME, config(inp, out, **sets), RunOptions(workers=workers, quiet=True))


def tree(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes, without the .prep/ bookkeeping (markers hold timings)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prep" not in p.relative_to(folder).parts}


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, dict[str, dict[str, bytes]]]]:
    root = tmp_path_factory.mktemp("raw")
    return root, make_inputs(root)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    inp, _ = inputs
    out = tmp_path_factory.mktemp("ref")
    result = run(inp, out)
    return out, result


def test_exact_accounting_equal_shards_and_bytes(inputs, reference):
    inp, expected = inputs
    out, result = reference
    assert result.ok and result.finalized, result.to_json()
    want = {k: m for tar in expected.values() for k, m in tar.items()}
    shards = sorted(out.glob("*.tar"))
    sizes = [len(scan_tar(s).samples) for s in shards]
    total = len(want)
    assert len(shards) == -(-total // CHUNK)
    assert sizes[:-1] == [CHUNK] * (len(shards) - 1) and sizes[-1] == total - CHUNK * (len(shards) - 1)
    got: dict[str, dict[str, bytes]] = {}
    for s in shards:
        part = read_shard(s)
        assert not set(part) & set(got)
        got.update(part)
        assert list(part) == sorted(part)  # written sorted by key
    assert got == want  # every kept sample, every member, byte for byte
    # global order: inputs by path, samples by key; shard j holds positions [j*C, (j+1)*C)
    order = [k for rel in sorted(expected) for k in sorted(expected[rel])]
    for j, s in enumerate(shards):
        assert sorted(read_shard(s)) == sorted(order[j * CHUNK:(j + 1) * CHUNK])

    counts, dropped = result.counts(), result.dropped()
    all_written = 0
    missing_txt = 0
    for rel in expected:
        scan = scan_tar(inp / rel, tolerate_damage=True)
        all_written += len(scan.samples)
        missing_txt += sum(1 for s in scan.samples if "txt" not in s.members)
    assert counts["samples_in"] == all_written
    assert counts["samples_out"] == total and counts["samples_filled"] == 0
    assert dropped == {"missing .txt": missing_txt}
    assert counts["samples_in"] == counts["samples_out"] + sum(dropped.values())
    assert counts["damaged_tars"] == 1
    notes = "\n".join(result.to_json()["notes"])
    assert "part1/00007.tar: damaged at byte" in notes
    report = [json.loads(line) for line in (out / ".prep" / rt.DROPPED_REPORT).read_text().splitlines()]
    assert len(report) == missing_txt and {r["reason"] for r in report} == {"missing .txt"}

    manifest = read_manifest(out)
    assert [e.path for e in manifest.shards] == [s.name for s in shards]
    assert manifest.total_samples == total and manifest.chunk_size == CHUNK
    assert set(manifest.fields) == {"jpg", "txt", "json"}
    assert all(not c.problems for c in verify_folder(out))  # .idx, sizes and checksums all agree
    assert not any(out.glob(".*tmp*"))


def test_process_pool_gives_identical_bytes_and_rerun_skips(inputs, reference, tmp_path):
    inp, _ = inputs
    ref_out, _ = reference
    result = run(inp, tmp_path, workers=2)
    assert result.ok
    assert tree(tmp_path) == tree(ref_out)
    again = run(inp, tmp_path, workers=2)
    assert {r.status for r in again.results} == {"skipped"} and tree(tmp_path) == tree(ref_out)


_KILLER = r"""
import os, signal, sys
import prep.formats.tar_write as tar_mod
import prep.stages.reorganize_tar as rt
from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

point, n, inp, out, chunk = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
calls = [0]

def killing(fn, before):
    def wrapped(*a, **k):
        calls[0] += 1
        if before and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        r = fn(*a, **k)
        if not before and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    return wrapped

tar_mod.WRITE_BLOCK = 4096  # many block writes per shard, so a kill can land inside one
if point == "mid-write":  # part of a shard in its temp file
    tar_mod._BlockSink.flush = killing(tar_mod._BlockSink.flush, True)
elif point == "before-idx":  # shard renamed into place, .idx not written
    rt.write_index = killing(rt.write_index, True)
elif point == "before-marker":  # shard and .idx done, no done-marker
    rt.write_index = killing(rt.write_index, False)
cfg = load_config(None, [f"reorganize_tar.input_dir={inp}", f"reorganize_tar.output_dir={out}",
                         f"reorganize_tar.tar_chunk_size={chunk}", "reorganize_tar.keep_other_members=true",
                         "reorganize_tar.file_ext_in_tar=[jpg, txt]"])
run = run_stage("reorganize_tar", cfg, RunOptions(workers=1, quiet=True))
sys.exit(0 if run.ok else 1)
"""


@pytest.mark.slow
def test_kill_9_at_any_point_then_rerun_gives_identical_bytes(inputs, reference, tmp_path):
    inp, _ = inputs
    ref_out, _ = reference
    for point, n in [("mid-write", 40), ("before-idx", 3), ("before-marker", 6), ("mid-write", 900)]:
        args = [point, str(n), str(inp), str(tmp_path), str(CHUNK)]
        proc = subprocess.run([sys.executable, "-c", _KILLER, *args], capture_output=True, text=True)
        assert proc.returncode == -9, (point, proc.stderr[-2000:])
    assert any(tmp_path.glob(".*.tar.tmp-*"))  # the last kill left a half-written temp file behind
    proc = subprocess.run([sys.executable, "-c", _KILLER, "none", "0", str(inp), str(tmp_path), str(CHUNK)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree(tmp_path) == tree(ref_out)
    assert not any(tmp_path.glob(".*tmp*"))


def test_strict_fails_on_damaged_input_but_keeps_output(inputs, tmp_path):
    inp, _ = inputs
    result = run(inp, tmp_path, strict="true")
    assert not result.ok
    assert "truncated or corrupt" in result.errors[0]
    assert len(list(tmp_path.glob("*.tar"))) > 0 and not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("tail", ["drop", "fill"])
def test_tail_policies(inputs, tmp_path, tail):
    inp, expected = inputs
    chunk = 300
    result = run(inp, tmp_path, tail=tail, tar_chunk_size=chunk)
    assert result.ok, result.to_json()
    total = sum(len(t) for t in expected.values())
    sizes = [len(scan_tar(s).samples) for s in sorted(tmp_path.glob("*.tar"))]
    order = [k for rel in sorted(expected) for k in sorted(expected[rel])]
    if tail == "drop":
        assert sizes == [chunk] * (total // chunk)
        assert result.dropped()["tail: drop"] == total % chunk
        last = read_shard(sorted(tmp_path.glob("*.tar"))[-1])
        assert sorted(last) == sorted(order[(total // chunk - 1) * chunk:(total // chunk) * chunk])
    else:
        assert sizes == [chunk] * (-(-total // chunk))
        last = read_shard(sorted(tmp_path.glob("*.tar"))[-1])
        fills = sorted(k for k in last if "_fill" in k)
        assert len(fills) == chunk - total % chunk == result.counts()["samples_filled"]
        last_name = sorted(tmp_path.glob("*.tar"))[-1].name  # the notes say where the copies went
        assert f"tail: fill filled the short last shard {last_name} with {len(fills)} copies" in " ".join(
            result.to_json()["notes"])
        assert fills == sorted(f"{k}_fill0" for k in order[: len(fills)])
        want = {k: m for tar in expected.values() for k, m in tar.items()}
        assert all(last[f"{k}_fill0"] == want[k] for k in order[: len(fills)])


def test_fill_cycles_when_there_are_fewer_samples_than_a_shard(tmp_path):
    inp = tmp_path / "in"
    _write_tar(inp / "a.tar", [(f"k{i}", {"jpg": bytes([i])}) for i in range(3)])
    result = run(inp, tmp_path / "out", tail="fill", tar_chunk_size=8, file_ext_in_tar="[]")
    assert result.ok
    keys = sorted(read_shard(tmp_path / "out" / "000000.tar"))
    assert keys == sorted(["k0", "k1", "k2", "k0_fill0", "k1_fill0", "k2_fill0", "k0_fill1", "k1_fill1"])


def test_a_tar_with_a_samples_members_apart_says_how_to_fix_it(tmp_path):
    """`tar -cf` of a folder lists files in directory order, so a.txt may follow b.jpg: the note says
    what is wrong and how to re-create the tar, and does not call the readable rest unreadable."""
    inp = tmp_path / "in"
    inp.mkdir()
    with tarfile.open(inp / "x.tar", "w") as tf:
        for name in ("a.jpg", "b.jpg", "a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    result = run(inp, tmp_path / "out", file_ext_in_tar="[]")
    notes = "\n".join(result.to_json()["notes"])
    assert "x.tar: damaged at byte 2048 (key 'a' appears twice, apart, in one tar)" in notes
    assert "fix: write each sample's members next to each other (tar --sort=name)" in notes
    assert "unreadable" not in notes


def test_image_extensions_in_any_case_are_written_lower_case(tmp_path):
    """A tar made from a camera folder (`IMG_1.JPG`, `b.Jpeg`, `c.PNG`) is repacked with canonical image
    member names, so file_ext_in_tar, energon's field map and the loaders find its images; other
    extensions keep their case; a sample with `a.jpg` and `a.JPG` is dropped and named, never written
    with two `.jpg` members or one of them lost silently."""
    from prep.formats.names import IMAGE_EXTS

    samples: list[tuple[str, dict[str, bytes]]] = []
    for e in IMAGE_EXTS:
        for variant in sorted({e, e.upper(), e.capitalize(), e[:-1] + e[-1].upper()}):
            samples.append((f"{variant}-{len(samples):03d}", {variant: os.urandom(40), "txt": b"c",
                                                              "Meta.JSON": b"{}"}))
    clashes = {"clash-jpg": {"jpg": b"1", "JPG": b"2", "txt": b"c"},
               "clash-png": {"Png": b"1", "PNG": b"2", "txt": b"c"}}
    _write_tar(tmp_path / "in" / "x.tar", sorted([*samples, *clashes.items()]))
    for ext_sets, out in (({"file_ext_in_tar": "[]"}, "all"),
                          ({"file_ext_in_tar": "[JPG, txt]", "keep_other_members": "false"}, "jpg")):
        result = run(tmp_path / "in", tmp_path / out, tar_chunk_size=7, **ext_sets)
        assert result.ok, result.to_json()["errors"]
        got: dict[str, dict[str, bytes]] = {}
        for shard in sorted((tmp_path / out).glob("*.tar")):
            got.update(read_shard(shard))
        want = {k: {(e.lower() if e.lower() in IMAGE_EXTS else e): v for e, v in m.items()}
                for k, m in samples}
        clashed = {"members .JPG, .jpg differ only in case": 1, "members .PNG, .Png differ only in case": 1}
        if out == "jpg":  # `JPG` in file_ext_in_tar is `jpg`, which every JPG, Jpg, jPG member now is
            want = {k: {"jpg": m["jpg"], "txt": m["txt"]} for k, m in want.items() if "jpg" in m}
            clashed["missing .jpg"] = len(samples) - len(want)
        assert got == want
        assert result.dropped() == clashed
        report = (tmp_path / out / ".prep" / rt.DROPPED_REPORT).read_text()
        assert '"key": "clash-jpg"' in report and '"key": "clash-png"' in report
        assert set(read_manifest(tmp_path / out).fields) == {e for m in want.values() for e in m}
    cache = tmp_path / "all" / ".prep" / rt.COUNTS_CACHE  # as an older prep left it: clashes counted
    doc = json.loads(cache.read_text())
    doc["version"] = rt.VERSION
    for entry in doc["tars"].values():
        entry[2] += len(clashes)
    cache.write_text(json.dumps(doc))
    assert run(tmp_path / "in", tmp_path / "all", tar_chunk_size=7, file_ext_in_tar="[]").ok


@pytest.mark.slow  # energon's import alone takes seconds
def test_a_camera_folders_tar_loads_in_energon_and_prep_raw_and_repacked(tmp_path):
    """`tar cf` of photos named `.JPG`/`.Jpeg`/`.PNG`: generate_wdinfo on the raw tar names those members
    in energon's field map as they are; repacked, they are `jpg`/`jpeg`/`png`, which prep's loaders and
    energon both find."""
    from megatron.energon import CaptioningSample, WorkerConfig, get_loader, get_val_dataset

    from prep.loaders import ShardDataset
    from prep.testing.servers import make_image

    exts = {"JPG": "jpeg", "Jpeg": "jpeg", "PNG": "png"}
    samples = [(f"IMG_{i:04d}", {ext: make_image(8, 6, fmt, i), "txt": f"photo {i}".encode()})
               for i, (ext, fmt) in enumerate(list(exts.items()) * 2)]
    _write_tar(tmp_path / "raw" / "photos.tar", samples)
    captions = {k: m["txt"].decode() for k, m in samples}
    assert run(tmp_path / "raw", tmp_path / "out", tar_chunk_size=4, file_ext_in_tar="[]").ok
    for folder, image in ((tmp_path / "raw", "JPG,Jpeg,PNG"), (tmp_path / "out", "jpg,jpeg,png")):
        cfg = load_config(None, [f"generate_wdinfo.input_dir={folder}", "generate_wdinfo.tar_chunk_size=4"])
        assert run_stage("generate_wdinfo", cfg, RunOptions(quiet=True)).ok
        assert f"image: {image}" in (folder / ".nv-meta" / "dataset.yaml").read_text()
        ds = get_val_dataset(folder, split_part="train", batch_size=None,
                             worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0))
        loaded = list(get_loader(ds))
        assert all(isinstance(s, CaptioningSample) and tuple(s.image.shape) == (3, 6, 8) for s in loaded)
        assert {s.__key__.rsplit("/", 1)[-1]: s.caption for s in loaded} == captions
    prep_ds = ShardDataset(tmp_path / "out", batch_size=6, decode="uint8", fields=["jpg|jpeg|png", "txt"],
                           shuffle=False, rank=0, world_size=1)
    batch = prep_ds.fetch(prep_ds.next_batch(), 0, 1)
    assert tuple(batch["jpg"].shape) == (6, 3, 6, 8)
    assert dict(zip(batch["__key__"], batch["txt"], strict=True)) == captions


def test_duplicate_keys_across_inputs_name_both_tars(tmp_path):
    inp = tmp_path / "in"
    _write_tar(inp / "a/00000.tar", [(f"{i:04d}", {"jpg": b"a", "txt": b"x"}) for i in range(5)])
    _write_tar(inp / "b/00000.tar", [(f"{i:04d}", {"jpg": b"b", "txt": b"y"}) for i in range(4, 9)])
    with pytest.raises(PrepError, match=r"'0004' is in two input tars: .*a/00000.tar and .*b/00000.tar"):
        run(inp, tmp_path / "out")
    # counted from img2dataset stats, the plan knows no keys: the check runs once the shards are written
    for part in "ab":
        (inp / part / "00000_stats.json").write_text(json.dumps({"successes": 5, "count": 5}))
    result = run(inp, tmp_path / "out2", count_from="stats", tar_chunk_size=5)
    assert not result.ok and "'0004' is in two input tars" in result.errors[0]
    assert not (tmp_path / "out2" / "manifest.json").exists()
    result = run(inp, tmp_path / "out3", count_from="stats")  # both copies would land in one shard
    assert [r.error for r in result.failed] == [result.failed[0].error]
    assert "'0004' is in two input tars: " in result.failed[0].error


def test_img2dataset_stats_are_used_when_trustworthy_and_checked(inputs, tmp_path):
    inp = tmp_path / "in"
    _write_tar(inp / "00000.tar", [(f"0{i:04d}", {"jpg": b"x" * i, "txt": b"t"}) for i in range(7)])
    _write_tar(inp / "00001.tar", [(f"1{i:04d}", {"jpg": b"y" * i, "txt": b"t"}) for i in range(5)])
    (inp / "00000_stats.json").write_text(json.dumps({"successes": 7, "count": 9}))
    (inp / "00001_stats.json").write_text(json.dumps({"successes": 5, "count": 5}))
    os.utime(inp / "00001_stats.json", ns=(1, 1))  # older than its tar: not trusted
    every = {"tar_chunk_size": 4, "file_ext_in_tar": "[]"}  # stats count samples, not required members

    def counted_by(**sets) -> dict[str, str]:
        tasks = rt.plan(config(inp, tmp_path / "out", **sets), RunOptions())
        return {m["rel"]: m["counted_by"] for t in tasks for m in t.payload["inputs"].values()}

    assert counted_by(**every) == {"00000.tar": "stats", "00001.tar": "scan"}
    assert counted_by(tar_chunk_size=4) == {"00000.tar": "scan", "00001.tar": "scan"}  # jpg, txt required
    assert run(inp, tmp_path / "out", **every).ok

    (inp / "00000_stats.json").write_text(json.dumps({"successes": 8, "count": 9}))  # wrong
    result = run(inp, tmp_path / "out3", **every)
    assert not result.ok
    assert any("planned 8 usable samples (from img2dataset's _stats.json) but the tar has 7" in r.error
               for r in result.failed)
    assert run(inp, tmp_path / "out4", tar_chunk_size=4, count_from="scan").ok


def test_samples_stats_count_but_file_ext_in_tar_drops_are_dropped_not_a_failure(tmp_path):
    """An ingested PNG (or a download without captions) is one of img2dataset's successes, yet lacks a
    required member: with file_ext_in_tar set the plan scans, so it is dropped and reported."""
    inp = tmp_path / "in"
    samples = [(f"{i:04d}", {"jpg": b"x" * i, "txt": b"t"}) for i in range(6)]
    samples[2] = ("0002", {"png": b"p", "txt": b"t"})
    _write_tar(inp / "00000.tar", samples)
    (inp / "00000_stats.json").write_text(json.dumps({"successes": 6, "count": 6}))
    result = run(inp, tmp_path / "out", tar_chunk_size=4)
    assert result.ok, result.to_json()["errors"]
    assert result.dropped() == {"missing .jpg": 1} and result.counts()["samples_out"] == 5


def test_truncated_tar_with_stats_is_not_trusted(inputs):
    inp, _ = inputs
    st = (inp / "part1/00007.tar").stat()
    assert rt.stats_count(inp / "part1/00007.tar", st.st_size, st.st_mtime_ns) is None


def test_output_inside_input_is_refused(inputs):
    inp, _ = inputs
    with pytest.raises(PrepError, match="inside input_dir"):
        run(inp, inp / "out")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(1, 30),
       st.sampled_from(["keep", "drop", "fill"]))
def test_layout_covers_every_position_once(counts, chunk, tail):
    total = sum(counts)
    shards = rt.layout(counts, chunk, tail)
    seen = [(i, p) for s in shards for i, a, b, suffix in s.segments if not suffix for p in range(a, b)]
    sizes = [sum(b - a for _, a, b, _ in s.segments) for s in shards]
    dropped = [(i, p) for s in shards for i, a, b in s.tail_dropped for p in range(a, b)]
    assert len(seen) == len(set(seen))
    assert sorted(seen + dropped) == [(i, p) for i, n in enumerate(counts) for p in range(n)] or (
        tail == "drop" and total < chunk and not shards)
    assert sum(1 for n in sizes if n != chunk) <= (1 if tail == "keep" else 0)
    assert all(n <= chunk for n in sizes)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=120), st.integers(0, 8**12))
def test_fast_member_header_is_byte_identical_to_tarfile(name, size):
    """reorganize_tar's throughput rests on prep.formats.tar's patched-template headers: they must be
    exactly tarfile's bytes (the slow path stays for long or non-ASCII names and huge sizes)."""
    assert tar_mod.member_header(name, size) == tar_mod._tarfile_header(name, size)
    assert tar_mod.member_header(f"{size:09d}.jpg", size) == tar_mod._tarfile_header(f"{size:09d}.jpg", size)


def test_task_refuses_an_input_changed_after_planning(tmp_path):
    inp = tmp_path / "in"
    _write_tar(inp / "a.tar", [(f"k{i}", {"jpg": bytes([i])}) for i in range(4)])
    cfg = config(inp, tmp_path / "out", tar_chunk_size=2, file_ext_in_tar="[]")
    tasks = rt.plan(cfg, RunOptions())
    os.utime(inp / "a.tar", ns=(1, 1))
    with pytest.raises(PrepError, match="input tar changed after the plan was made"):
        rt.run_task(tasks[0], cfg, RunOptions())
    assert not (tmp_path / "out" / "000000.tar").exists()


def test_first_duplicate_reads_only_overlapping_tars_and_finds_the_pair():
    keys = {"a": ["k01", "k03", "k05"], "b": ["k02", "k04"], "c": ["k10", "k11"], "d": ["k11", "k12"]}
    read: list[str] = []

    def keys_of(tar: str) -> list[str]:
        read.append(tar)
        return keys[tar]

    ranges = {t: (min(k), max(k)) for t, k in keys.items()}
    assert rt.first_duplicate({t: ranges[t] for t in "abc"}, keys_of) is None  # interleaved, all unique
    assert set(read) == {"a", "b"}  # c's range overlaps nothing: never read
    assert rt.first_duplicate(ranges, keys_of) == ("k11", "c", "d")


def test_scan_cache_keeps_the_plans_first_tars_and_tasks_evict_finished_ones():
    from types import SimpleNamespace

    made: list[str] = []

    def scan(name: str, n: int):
        def make():
            made.append(name)
            return SimpleNamespace(scan=SimpleNamespace(samples=[0] * n))
        return make

    cache = rt._ScanCache(budget=10)
    for name in "abc":  # the plan: c does not fit, so a and b (what the first tasks need) stay
        cache.get((name,), scan(name, 4), evict=False)
    assert list(cache.items) == [("a",), ("b",)]
    cache.get(("a",), scan("a", 4), evict=True)  # first task: hit
    cache.get(("c",), scan("c", 4), evict=True)  # later task: miss, evicts b (least recently used)
    assert made == ["a", "b", "c", "c"] and list(cache.items) == [("a",), ("c",)] and cache.samples == 8


def test_header_scan_threads_follow_the_filesystem() -> None:
    from prep.stages.reorganize_tar import filesystem_type, scan_threads_for

    assert filesystem_type(Path("/proc/self")) == "proc"  # the longest mount point above the path wins
    kinds = ("nfs4", "lustre", "fuse.sshfs", "ext4", "xfs", "")
    assert [scan_threads_for(t) for t in kinds] == [8, 8, 8, 1, 1, 1]
