"""The stage runtime, driven through the real generate_wdinfo stage: done-markers, changed inputs,
failures that do not stop the others, Slurm-array slicing with finalize once, stale temp cleanup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from prep.config import load_config
from prep.errors import PrepError
from prep.formats.checksum import file_checksum
from prep.formats.tar_write import write_shard
from prep.formats.wdinfo import read_wdinfo
from prep.runtime.runner import run_stage
from prep.runtime.summary import print_summary
from prep.stages.base import RunOptions, Task, slice_tasks

QUIET = Console(quiet=True)


def make_shards(folder: Path, n: int, per: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n):
        samples = [
            (f"s{s:03d}_{i:04d}", {"jpg": b"\xff" * (i + 1), "txt": f"c{s}.{i}".encode()}) for i in range(per)
        ]
        paths.append(folder / f"shard-{s:03d}.tar")
        write_shard(paths[-1], samples, fsync=False)
    return paths


def cfg_for(folder: Path, *extra: str):
    return load_config(
        None, [f"generate_wdinfo.input_dir={folder}", "generate_wdinfo.tar_chunk_size=3", *extra]
    )


def run(folder: Path, *extra: str, **opts):
    return run_stage("generate_wdinfo", cfg_for(folder, *extra), RunOptions(quiet=True, **opts), QUIET)


def test_markers_skip_finished_tasks(tmp_path: Path) -> None:
    make_shards(tmp_path, 4)
    first = run(tmp_path)
    assert first.ok and first.finalized and [r.status for r in first.results] == ["done"] * 4
    markers = sorted((tmp_path / ".prep/done/generate_wdinfo").glob("*.json"))
    assert len(markers) == 4
    doc = json.loads(markers[0].read_text())
    out = doc["outputs"][str((tmp_path / "shard-000.tar.idx").resolve())]
    assert out["bytes"] == 32 and out["checksum"] == file_checksum(tmp_path / "shard-000.tar.idx")
    second = run(tmp_path)
    assert [r.status for r in second.results] == ["skipped"] * 4
    assert second.counts()["samples"] == 12, "skipped tasks still report their counts"
    assert second.finalized
    forced = run(tmp_path, force=True)
    assert [r.status for r in forced.results] == ["done"] * 4


def test_a_rerun_with_every_task_done_does_no_work_and_says_so(tmp_path: Path) -> None:
    make_shards(tmp_path, 3)
    run(tmp_path)
    manifest = tmp_path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = run(tmp_path)
    assert again.nothing_to_do and again.finalized and again.finalize_notes == []
    assert manifest.stat().st_mtime_ns == stamp, "finalize ran again although nothing changed"
    console = Console(record=True, width=200)
    print_summary(again, console)
    text = console.export_text()
    assert "nothing to do" in text and "samples/s" not in text and "wrote" not in text
    manifest.unlink()  # a file finalize wrote is gone: finalize runs again, the tasks stay skipped
    repaired = run(tmp_path)
    assert not repaired.nothing_to_do and manifest.exists()
    assert {r.status for r in repaired.results} == {"skipped"} and repaired.finalize_notes


def test_finalize_reruns_when_a_setting_it_reads_changes_or_any_file_it_wrote_is_gone(tmp_path: Path) -> None:
    """The tasks stay skipped, but finalize reads settings of its own (wdinfo's chunk_size, write_nv_meta,
    strict) and writes files in hidden folders (.nv-meta/): a change to either must not be skipped."""
    make_shards(tmp_path, 3)
    run(tmp_path)
    rechunked = run(tmp_path, "generate_wdinfo.tar_chunk_size=4")
    assert {r.status for r in rechunked.results} == {"skipped"}
    assert read_wdinfo(tmp_path / "wdinfo.pkl")["chunk_size"] == 4
    strict = run(tmp_path, "generate_wdinfo.tar_chunk_size=4", strict=True)
    assert not strict.ok and "do not hold tar_chunk_size=4" in strict.errors[0]
    run(tmp_path, "generate_wdinfo.write_nv_meta=false")
    shutil.rmtree(tmp_path / ".nv-meta")
    run(tmp_path)
    assert (tmp_path / ".nv-meta" / ".info.json").exists()
    shutil.rmtree(tmp_path / ".nv-meta")
    run(tmp_path)
    assert (tmp_path / ".nv-meta" / ".info.json").exists()
    (tmp_path / "wdinfo.pkl").unlink()  # unchanged by the last finalize, but finalize's all the same
    assert run(tmp_path).finalize_notes and (tmp_path / "wdinfo.pkl").exists()


def test_changed_input_or_damaged_output_reruns(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 3)
    run(tmp_path)
    write_shard(shards[1], [("new_0001", {"txt": b"x"})], fsync=False)  # input changed
    (tmp_path / "shard-002.tar.idx").write_bytes(b"\x00" * 8)  # output changed size
    again = run(tmp_path)
    assert [r.status for r in again.results] == ["skipped", "done", "done"]
    assert again.counts()["samples"] == 7
    same_size = tmp_path / "shard-000.tar.idx"
    same_size.write_bytes(b"\x01" * same_size.stat().st_size)  # same size: only --verify-markers sees it
    assert run(tmp_path).results[0].status == "skipped"
    assert run(tmp_path, verify_markers=True).results[0].status == "done"


def test_a_failing_task_fails_the_run_while_the_others_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_shards(data, 4)
    (data / "shard-001.tar").write_bytes(b"this is not a tar" * 100)
    result = run(data)
    assert not result.ok and not result.finalized
    assert [r.status for r in result.results] == ["done", "failed", "done", "done"]
    assert "shard-001.tar" in result.failed[0].error and "checksum" in result.failed[0].error
    assert not (data / "manifest.json").exists(), "finalize waits for every task"
    doc = result.to_json()
    assert doc["failed"] == 1 and doc["done"] == 3 and doc["errors"][0].startswith("0-shard-001.tar: ")
    fresh = make_shards(tmp_path / "fresh", 2)[1]
    fresh.replace(data / "shard-001.tar")  # repaired: only the failed task runs again
    fixed = run(data)
    assert [r.status for r in fixed.results] == ["skipped", "done", "skipped", "skipped"] and fixed.finalized


def test_process_pool_gives_the_same_outputs(tmp_path: Path) -> None:
    make_shards(tmp_path / "a", 5)
    make_shards(tmp_path / "b", 5)
    (tmp_path / "b" / "shard-003.tar").write_bytes(b"junk" * 300)
    (tmp_path / "a" / "shard-003.tar").write_bytes(b"junk" * 300)
    inline = run(tmp_path / "a")
    pooled = run(tmp_path / "b", workers=2)
    assert [r.status for r in pooled.results] == [r.status for r in inline.results]
    assert [r.status for r in pooled.results].count("failed") == 1
    for name in ("shard-000.tar.idx", "shard-004.tar.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_slurm_slices_cover_every_task_once_and_finalize_after_all(tmp_path: Path) -> None:
    make_shards(tmp_path, 7)
    seen: list[str] = []
    for i in (2, 0, 1):
        part = run(tmp_path, task_index=i, num_tasks=3)
        assert part.planned == 7
        seen += [r.task_id for r in part.results if r.status == "done"]
        if i != 1:
            assert part.waiting_for_other_slices and not part.finalized
            assert not (tmp_path / "wdinfo.pkl").exists()
    assert part.finalized and not part.waiting_for_other_slices
    assert sorted(seen) == sorted(f"0-shard-{s:03d}.tar" for s in range(7))
    assert (tmp_path / "wdinfo.pkl").exists() and (tmp_path / "manifest.json").exists()


@given(st.integers(0, 60), st.integers(1, 9))
def test_slices_partition_the_plan(n: int, k: int) -> None:
    tasks = [Task(f"t{i}", {"i": i}) for i in range(n)]
    parts = [slice_tasks(tasks, i, k) for i in range(k)]
    ids = [t.id for p in parts for t in p]
    assert sorted(ids) == sorted(t.id for t in tasks) and len(ids) == len(set(ids))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize(("index", "num"), [(3, 3), (-1, 2), (0, 0), (None, 2), (1, None)])
def test_bad_slices_are_errors(index, num) -> None:
    with pytest.raises(PrepError, match="not a valid slice"):
        slice_tasks([Task("a", {})], index, num)


def test_fingerprint_depends_on_payload_stage_and_version() -> None:
    t = Task("a", {"x": 1})
    assert t.fingerprint("s", 1) == Task("a", {"x": 1}).fingerprint("s", 1)
    assert (
        len(
            {
                t.fingerprint("s", 1),
                t.fingerprint("s", 2),
                t.fingerprint("r", 1),
                Task("a", {"x": 2}).fingerprint("s", 1),
            }
        )
        == 4
    )


def test_stale_temp_files_of_a_killed_task_are_removed(tmp_path: Path) -> None:
    make_shards(tmp_path, 2)
    stale = tmp_path / ".shard-000.tar.idx.tmp-999999"
    stale.write_bytes(b"half written")
    unrelated = tmp_path / ".other.tmp-1"
    unrelated.write_bytes(b"keep")
    assert run(tmp_path).ok
    assert not stale.exists() and unrelated.exists()


def test_dry_run_plans_without_writing(tmp_path: Path) -> None:
    make_shards(tmp_path, 2)
    plan = run(tmp_path, dry_run=True)
    assert [r.status for r in plan.results] == ["planned", "planned"]
    assert plan.results[0].data["payload"]["rel"] == "shard-000.tar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000.tar", "shard-001.tar"]


def test_summary_table_and_json(tmp_path: Path) -> None:
    make_shards(tmp_path, 2)
    (tmp_path / "shard-001.tar").write_bytes(b"junk" * 200)
    result = run(tmp_path)
    console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    print_summary(result, console)
    text = console.export_text()
    assert "1 / 0 / 1" in text and "error: 0-shard-001.tar" in text
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["ok"] is False and doc["counts"]["samples"] == 3 and doc["tasks_planned"] == 2


def test_a_resumed_runs_rate_counts_only_the_samples_it_made(tmp_path: Path) -> None:
    """3 of 4 shards were done by an earlier run: samples/s (the table's, and the summary file's that
    `prep report` charts) is this run's 3 samples over its time, not all 12."""
    make_shards(tmp_path, 4)
    run(tmp_path)
    (tmp_path / "shard-002.tar.idx").unlink()
    resumed = run(tmp_path)
    assert [r.status for r in resumed.results] == ["skipped", "skipped", "done", "skipped"]
    assert resumed.counts()["samples"] == 12 and resumed.samples_done() == 3
    console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    print_summary(resumed, console)
    rate = next(line for line in console.export_text().splitlines() if "samples/s" in line)
    assert rate.split()[-2] == f"{3 / resumed.seconds:,.0f}"
    kept = json.loads((tmp_path / ".prep/summary/generate_wdinfo.json").read_text())
    assert kept["samples_done"] == 3


def test_unexpected_exceptions_become_failed_results_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prep.stages.generate_wdinfo as gw

    make_shards(tmp_path, 2)
    real = gw.run_task

    def flaky(task, root, opts):
        if task.id.endswith("001.tar"):
            raise KeyError("boom")
        return real(task, root, opts)

    monkeypatch.setattr(gw, "run_task", flaky)
    result = run(tmp_path)
    assert [r.status for r in result.results] == ["done", "failed"]
    assert result.failed[0].error == "KeyError: 'boom'" and result.failed[0].notes == []
    debug = run(tmp_path, debug=True)
    assert "Traceback" in debug.failed[0].notes[0]

    def full(task, root, opts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gw, "run_task", full)
    (err,) = run(tmp_path, force=True).grouped_errors()  # every task alike: one line, with its fix
    assert "No space left on device — fix: free space on that disk" in err and "× 2 tasks" in err


def test_long_task_ids_get_valid_marker_names(tmp_path: Path) -> None:
    from prep.runtime.markers import marker_path

    deep = "/".join(["a-rather-long-folder-name"] * 20) + "/shard.tar"
    a, b = marker_path(tmp_path, Task(deep, {})), marker_path(tmp_path, Task(deep + "x", {}))
    assert a != b and len(a.name.encode()) <= 255 and len(b.name.encode()) <= 255
    assert marker_path(tmp_path, Task("0-sub/x.tar", {})).name == "0-sub%2Fx.tar.json"


_ID_PARTS = st.sampled_from(["a", "b", "/", "_", "__", "%", "%2F", "%25", "2F", ".", "é", "x" * 120])


@given(ids=st.sets(st.lists(_ID_PARTS, min_size=1, max_size=8).map("".join), min_size=2, max_size=40))
def test_distinct_names_never_share_a_marker_file(ids: set[str]) -> None:
    from prep.stages.base import marker_file

    files = {marker_file(Path("m"), i) for i in ids}
    assert len(files) == len(ids)  # injective, also for ids cut to a head plus a hash
    assert all("/" not in f.name and len(f.name.encode()) <= 255 for f in files)


def test_shards_whose_names_escaped_alike_keep_their_own_markers(tmp_path: Path) -> None:
    """`a/b.tar` and `a__b.tar` (one marker file under the old `/` -> `__` escape) each keep a marker: a
    re-run does nothing, and neither task's marker overwrites the other's."""
    for rel in ("a/b.tar", "a__b.tar", "a%2Fb.tar", "a%252Fb.tar"):
        make_shards(tmp_path / "tmp", 1)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tmp" / "shard-000.tar").rename(tmp_path / rel)
    shutil.rmtree(tmp_path / "tmp")
    assert run(tmp_path).ok
    assert len(list((tmp_path / ".prep/done/generate_wdinfo").glob("*.json"))) == 4
    again = run(tmp_path)
    assert again.nothing_to_do and [r.status for r in again.results] == ["skipped"] * 4


def test_markers_an_older_prep_wrote_still_count(tmp_path: Path) -> None:
    """A marker under the legacy name (`/` as `__`) is read, so a folder an older prep finished is not
    redone; a task done again replaces it with its own marker (readers of every marker see it once)."""
    from prep.stages.base import legacy_marker_file

    make_shards(tmp_path / "sub", 2)
    assert run(tmp_path).ok
    done = tmp_path / ".prep/done/generate_wdinfo"
    for p in sorted(done.glob("*.json")):  # the names an older prep gave them
        p.rename(legacy_marker_file(done, json.loads(p.read_text())["task_id"]))
    assert sorted(p.name for p in done.glob("*.json")) == [f"0-sub__shard-00{i}.tar.json" for i in range(2)]
    again = run(tmp_path)
    assert again.nothing_to_do and [r.status for r in again.results] == ["skipped"] * 2
    make_shards(tmp_path / "sub", 2, per=4)  # both inputs change: both tasks run again
    assert [r.status for r in run(tmp_path).results] == ["done"] * 2
    assert sorted(p.name for p in done.glob("*.json")) == [f"0-sub%2Fshard-00{i}.tar.json" for i in range(2)]


def test_a_legacy_marker_two_tasks_shared_counts_only_for_the_one_it_names(tmp_path: Path) -> None:
    """Under the old escape `sub/shard-000.tar` and `sub__shard-000.tar` had one marker file, holding
    whichever ran last: that task is skipped, the other runs and leaves that file alone."""
    make_shards(tmp_path / "sub", 1)
    make_shards(tmp_path / "x", 1)
    (tmp_path / "x" / "shard-000.tar").rename(tmp_path / "sub__shard-000.tar")
    shutil.rmtree(tmp_path / "x")
    assert run(tmp_path).ok
    done = tmp_path / ".prep/done/generate_wdinfo"
    (done / "0-sub%2Fshard-000.tar.json").unlink()  # the older prep's state: one file, the last writer's
    second = run(tmp_path)
    by_id = {r.task_id: r.status for r in second.results}
    assert by_id == {"0-sub/shard-000.tar": "done", "0-sub__shard-000.tar": "skipped"}
    assert run(tmp_path).nothing_to_do


def test_errors_survive_process_pools() -> None:
    import pickle

    from prep.errors import PrepErrorGroup
    from prep.formats.names import UnsafeMemberError
    from prep.formats.tar import TarFormatError

    for err in [
        PrepError("w", "a.tar", "f"),
        TarFormatError("t", "b.tar", "g", offset=1536),
        UnsafeMemberError("u", "c.tar", "h"),
        PrepErrorGroup([PrepError("x", "y", "z"), PrepError("q")]),
    ]:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.line() == err.line()
        assert getattr(back, "offset", None) == getattr(err, "offset", None)
        assert [e.line() for e in getattr(back, "errors", [])] == [
            e.line() for e in getattr(err, "errors", [])
        ]


def test_corrupt_or_foreign_markers_mean_rerun(tmp_path: Path) -> None:
    make_shards(tmp_path, 3)
    run(tmp_path)
    markers = sorted((tmp_path / ".prep/done/generate_wdinfo").glob("*.json"))
    markers[0].write_text("[1, 2]")
    doc = json.loads(markers[1].read_text())
    del doc["result"]
    markers[1].write_text(json.dumps(doc))
    markers[2].write_bytes(b"\xff\xfe not utf-8")
    assert [r.status for r in run(tmp_path).results] == ["done", "done", "done"]


def test_temp_names_are_unique_per_writer(tmp_path: Path) -> None:
    from prep.formats.atomic import remove_stale_temps, temp_name, write_bytes_atomic

    final = tmp_path / "manifest.json"
    names = {temp_name(final) for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith(".manifest.json.tmp-") for n in names)
    for n in list(names)[:3]:
        n.write_bytes(b"left by a killed writer")
    write_bytes_atomic(final, b"{}")
    assert final.read_bytes() == b"{}" and remove_stale_temps(final) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


FORK_WATCH = """
import json, os, sys, threading
from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions


def threads_now():
    with open("/proc/self/stat") as f:  # field 20, the process's threads: what Python 3.12 warns on at a fork
        return int(f.read().rpartition(")")[2].split()[17])


def main():
    forks = []
    os.register_at_fork(before=lambda: forks.append(threads_now()))
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()  # a thread of the caller (torch's, a notebook's)
    cfg = load_config(None, [f"generate_wdinfo.input_dir={sys.argv[1]}", "generate_wdinfo.tar_chunk_size=3"])
    run = run_stage("generate_wdinfo", cfg, RunOptions(workers=2))  # with its progress bar's thread
    stop.set()
    print(json.dumps({"ok": run.ok, "done": [r.status for r in run.results].count("done"),
                      "forked_with_threads": [n for n in forks if n > 1]}))


if __name__ == "__main__":
    main()
"""


def test_the_process_pool_never_forks_a_multi_threaded_process(tmp_path: Path) -> None:
    """Python 3.12 warns at every fork of a process with threads (`use of fork() may lead to deadlocks in
    the child`); a forked worker of a process whose threads held locks or ran a thread team can hang."""
    make_shards(tmp_path / "data", 4)
    (tmp_path / "watch.py").write_text(FORK_WATCH)
    proc = subprocess.run([sys.executable, str(tmp_path / "watch.py"), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"ok": True, "done": 4, "forked_with_threads": []}


UNGUARDED = """
import json, os, sys
from prep.config import load_config
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

first, second = sys.argv[1], sys.argv[2]
opts = {"quiet": True, "force": True}  # every call does its work again
run_stage("generate_wdinfo", load_config(None, [f"generate_wdinfo.input_dir={first}"]), RunOptions(**opts))
summary = os.path.join(first, ".prep", "summary", "generate_wdinfo.json")
written = lambda: (os.stat(summary).st_ino, os.stat(summary).st_mtime_ns)  # a rewrite renames a new file
before = written()
run = run_stage("generate_wdinfo", load_config(None, [f"generate_wdinfo.input_dir={second}"]),
                RunOptions(workers=2, **opts))
print(json.dumps({"ok": run.ok, "first_run_again": written() != before}))
"""


def test_a_script_without_a_main_guard_gets_one_line_and_its_stages_are_not_run_again(tmp_path: Path) -> None:
    """Pool workers start as fresh interpreters that import the main script: a run_stage call it does not
    keep under `if __name__ == "__main__":` stops there instead of running the script's stages again."""
    make_shards(tmp_path / "first", 2)
    make_shards(tmp_path / "second", 4)
    (tmp_path / "unguarded.py").write_text(UNGUARDED)
    proc = subprocess.run([sys.executable, str(tmp_path / "unguarded.py"), str(tmp_path / "first"),
                           str(tmp_path / "second")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"ok": False, "first_run_again": False}
    line = (f"PrepError: {tmp_path / 'unguarded.py'}: run_stage was called while a worker process imported "
            'your script — fix: put the script\'s run_stage calls under `if __name__ == "__main__":`')
    assert line in proc.stderr
