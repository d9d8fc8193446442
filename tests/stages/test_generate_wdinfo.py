"""generate_wdinfo end to end: indexes, true counts, wdinfo.pkl/manifest/.nv-meta, loud uneven shards,
--strict, clear errors, multiple folders, and a SIGKILLed `prep run` that resumes to identical files."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from prep.config import load_config
from prep.errors import PrepError
from prep.formats.index import read_index
from prep.formats.manifest import read_manifest
from prep.formats.tar import scan_tar
from prep.formats.tar_write import write_shard
from prep.formats.wdinfo import read_wdinfo
from prep.runtime.runner import run_stage
from prep.stages.base import RunOptions

QUIET = Console(quiet=True)


def make_shards(folder: Path, counts: list[int], prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(counts):
        samples = [
            (
                f"{prefix}{s:03d}_{i:05d}",
                {
                    "jpg": b"\xff\xd8" + bytes([i % 256]) * 50,
                    "txt": f"caption {s} {i}".encode(),
                    "json": b"{}",
                },
            )
            for i in range(n)
        ]
        write_shard(folder / f"shard-{s:03d}.tar", samples, fsync=False)


def run(folders: list[Path] | Path, *extra: str, **opts):
    folders = folders if isinstance(folders, list) else [folders]
    sets = ["generate_wdinfo.input_dir=[" + ", ".join(str(f) for f in folders) + "]", *extra]
    return run_stage("generate_wdinfo", load_config(None, sets), RunOptions(quiet=True, **opts), QUIET)


def dataset_files(folder: Path) -> dict[str, bytes]:
    """Every file a user keeps (runtime markers under .prep/ excluded)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".prep" not in p.relative_to(folder).parts
    }


def test_indexes_counts_and_metadata(tmp_path: Path) -> None:
    make_shards(tmp_path, [4, 4, 4, 2])
    result = run(tmp_path, "generate_wdinfo.tar_chunk_size=4", "generate_wdinfo.file_ext_in_tar=[jpg, txt]")
    assert result.ok and result.finalized
    assert result.counts() == {"shards": 4, "samples": 14, "indexes_written": 4, "members_skipped": 0}
    for s in range(4):
        tar = tmp_path / f"shard-{s:03d}.tar"
        scan = scan_tar(tar)
        assert read_index(tar).tolist() == [x.offset for x in scan.samples] + [scan.end]
    wd = read_wdinfo(tmp_path / "wdinfo.pkl")
    assert wd == {
        "tar_files": [f"shard-{s:03d}.tar" for s in range(4)],
        "chunk_size": 4,
        "total_key_count": 14,
    }
    m = read_manifest(tmp_path)
    assert [(e.path, e.samples) for e in m.shards] == [
        ("shard-000.tar", 4),
        ("shard-001.tar", 4),
        ("shard-002.tar", 4),
        ("shard-003.tar", 2),
    ]
    assert m.total_samples == 14 and m.chunk_size == 4
    assert m.fields == {"jpg": {"samples": 14}, "json": {"samples": 14}, "txt": {"samples": 14}}
    assert m.history[-1]["stage"] == "generate_wdinfo"
    assert (tmp_path / ".nv-meta" / ".info.json").exists()
    notes = "\n".join(result.to_json()["notes"])
    assert "shard-003.tar holds 2 samples: the one short last shard" in notes and "WARNING" not in notes


def test_short_shards_other_than_the_last_are_a_warning(tmp_path: Path) -> None:
    for counts, named in (([4, 2, 4], "shard-001.tar has 2"), ([4, 4, 6], "shard-002.tar has 6"),
                          ([4, 3, 2], "shard-001.tar has 3")):
        folder = tmp_path / "".join(map(str, counts))
        make_shards(folder, counts)
        notes = "\n".join(run(folder, "generate_wdinfo.tar_chunk_size=4").to_json()["notes"])
        assert named in notes and "WARNING" in notes and "one short last shard" not in notes


def test_chunk_size_defaults_to_most_common_count(tmp_path: Path) -> None:
    make_shards(tmp_path, [3, 5, 5])
    assert run(tmp_path).ok
    assert read_wdinfo(tmp_path / "wdinfo.pkl")["chunk_size"] == 5


@pytest.mark.parametrize("counts", [[4, 4, 4], [4, 4, 1], [3], [4, 3]])
def test_strict_accepts_equal_shards_and_a_short_last_one(tmp_path: Path, counts: list[int]) -> None:
    """What reorganize_tar writes (every shard full, or the one short last shard of tail: keep) passes
    strict, both as the key and as --strict."""
    make_shards(tmp_path, counts)
    for how in ({"strict": True}, {"force": True}):
        extra = () if "strict" in how else ("generate_wdinfo.strict=true",)
        result = run(tmp_path, "generate_wdinfo.tar_chunk_size=4", *extra, **how)
        assert result.ok, result.errors
        assert read_wdinfo(tmp_path / "wdinfo.pkl")["total_key_count"] == sum(counts)


@pytest.mark.parametrize(("counts", "first"), [
    ([4, 3, 4], "shard-001.tar with 3"), ([4, 3, 2], "shard-001.tar with 3"),
    ([4, 4, 5], "shard-002.tar with 5"), ([5, 4, 4], "shard-000.tar with 5"),
    ([4, 2, 4, 4], "shard-001.tar with 2")])
def test_strict_fails_on_uneven_shards_other_than_a_short_last_one(tmp_path: Path, counts: list[int],
                                                                     first: str) -> None:
    make_shards(tmp_path, counts)
    result = run(tmp_path, "generate_wdinfo.tar_chunk_size=4", strict=True)
    assert not result.ok and first in result.errors[0]
    assert not (tmp_path / "wdinfo.pkl").exists()


def test_strict_takes_each_folders_own_last_shard(tmp_path: Path) -> None:
    make_shards(tmp_path / "a", [4, 2], prefix="a")
    make_shards(tmp_path / "b", [4, 4, 3], prefix="b")
    assert run([tmp_path / "a", tmp_path / "b"], "generate_wdinfo.tar_chunk_size=4", strict=True).ok
    make_shards(tmp_path / "c", [1, 4], prefix="c")  # c's short shard is its first
    result = run([tmp_path / "a", tmp_path / "b", tmp_path / "c"], "generate_wdinfo.tar_chunk_size=4",
                 strict=True)
    assert not result.ok and "1 shard(s)" in result.errors[0] and "c/shard-000.tar with 1" in result.errors[0]


def test_strict_fails_on_missing_members(tmp_path: Path) -> None:
    make_shards(tmp_path / "m", [2])
    result = run(tmp_path / "m", "generate_wdinfo.file_ext_in_tar=[png]", "generate_wdinfo.strict=true")
    assert not result.ok and "2 sample(s) lack a required member" in result.errors[0]
    assert "sample '000_00000' has no .png" in "\n".join(result.to_json()["notes"])


def test_existing_correct_index_is_kept_and_wrong_one_rebuilt(tmp_path: Path) -> None:
    make_shards(tmp_path, [3, 3])
    run(tmp_path)
    (tmp_path / "shard-001.tar.idx").write_bytes((0).to_bytes(8, "little") + (512).to_bytes(8, "little"))
    result = run(tmp_path, force=True)
    assert result.counts()["indexes_written"] == 1
    scan = scan_tar(tmp_path / "shard-001.tar")
    assert read_index(tmp_path / "shard-001.tar").tolist()[-1] == scan.end


def test_recursive_and_several_folders(tmp_path: Path) -> None:
    make_shards(tmp_path / "a", [2], prefix="a")
    make_shards(tmp_path / "a" / "sub", [2], prefix="s")
    make_shards(tmp_path / "b", [2, 2], prefix="b")
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    result = run([tmp_path / "a", tmp_path / "b"], f"generate_wdinfo.output_wdinfo_path={tmp_path}/wd.pkl")
    assert result.ok
    wd = read_wdinfo(tmp_path / "wd.pkl")
    assert wd["tar_files"] == ["a/shard-000.tar", "a/sub/shard-000.tar", "b/shard-000.tar", "b/shard-001.tar"]
    assert wd["total_key_count"] == 8
    assert [e.path for e in read_manifest(tmp_path / "a").shards] == ["shard-000.tar", "sub/shard-000.tar"]
    assert read_manifest(tmp_path / "b").total_samples == 4
    flat = run(tmp_path / "a", "generate_wdinfo.recursive=false")
    assert flat.planned == 1


def test_wdinfo_elsewhere_lists_shards_relative_to_its_own_folder(tmp_path: Path) -> None:
    """NeMo and prep's loaders read tar_files relative to wdinfo.pkl's folder: one placed above the shard
    folder lists them from there; one beside it could list them only by leaving its folder: refused."""
    make_shards(tmp_path / "data" / "shards", [2, 2])
    assert run(tmp_path / "data" / "shards", f"generate_wdinfo.output_wdinfo_path={tmp_path}/wd.pkl").ok
    wd = read_wdinfo(tmp_path / "wd.pkl")
    assert wd["tar_files"] == ["data/shards/shard-000.tar", "data/shards/shard-001.tar"]
    assert all((tmp_path / t).is_file() for t in wd["tar_files"])
    with pytest.raises(PrepError, match="does not hold the shard folder"):
        run(tmp_path / "data" / "shards", f"generate_wdinfo.output_wdinfo_path={tmp_path}/data/meta/wd.pkl")


def test_keeps_fields_recorded_by_earlier_stages(tmp_path: Path) -> None:
    make_shards(tmp_path, [2])
    run(tmp_path)
    m = read_manifest(tmp_path)
    m.fields["jpg"]["dtype"] = "uint8"
    m.encoders = {"vae": {"class": "AutoencoderKL"}}
    from prep.formats.manifest import write_manifest

    write_manifest(tmp_path, m)
    run(tmp_path, force=True)
    again = read_manifest(tmp_path)
    assert again.fields["jpg"] == {"dtype": "uint8", "samples": 2} and again.encoders == m.encoders
    assert [h["stage"] for h in again.history] == ["generate_wdinfo"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.mkdir(), "no .tar shards found"),
        (lambda d: (d.mkdir(), (d / "a.parquet").write_bytes(b"PAR1")), "no .tar shards found"),
        (lambda d: None, "does not exist"),
        (lambda d: d.write_text("x"), "is a file"),
    ],
)
def test_folder_errors(tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "in"
    setup(folder)
    with pytest.raises(PrepError, match=message) as err:
        run(folder)
    assert str(folder) in err.value.line()


def test_bad_shards_fail_their_task_with_a_clear_error(tmp_path: Path) -> None:
    make_shards(tmp_path, [3, 3, 3])
    data = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(data[:1500])  # truncated
    (tmp_path / "shard-002.tar").write_bytes(b"PK\x03\x04 zip, not tar" * 40)
    with tarfile.open(tmp_path / "shard-003.tar", "w") as t:  # only a directory: no samples
        t.addfile(tarfile.TarInfo("dir/"))
    result = run(tmp_path)
    errors = {r.task_id: r.error for r in result.failed}
    assert "truncated at byte 1500" in errors["0-shard-001.tar"]
    assert "checksum" in errors["0-shard-002.tar"]
    assert "no samples" in errors["0-shard-003.tar"]
    assert all(str(tmp_path) in e for e in errors.values())
    assert not result.ok and not (tmp_path / "wdinfo.pkl").exists()


def test_shards_written_by_tarfile_with_skipped_members(tmp_path: Path) -> None:
    buf = tmp_path / "t.tar"
    with tarfile.open(buf, "w", format=tarfile.GNU_FORMAT) as t:
        for name in ["__meta__/info.json", "k" * 120 + ".jpg", "k" * 120 + ".txt", "README"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    result = run(tmp_path, "generate_wdinfo.tar_chunk_size=1")
    assert result.ok and result.counts()["members_skipped"] == 2
    assert pickle.loads((tmp_path / "wdinfo.pkl").read_bytes())["total_key_count"] == 1


KILLER = """
import sys
import prep.stages.generate_wdinfo as g
point, after = sys.argv.pop(1), int(sys.argv.pop(1))
calls = [0]
real = getattr(g, point)
def stop_here(*args, **kw):
    calls[0] += 1
    if calls[0] > after:
        if point == "write_index":  # stopped mid-write: a temp file exists
            from pathlib import Path
            from prep.formats.atomic import temp_name
            temp_name(Path(str(args[0]) + ".idx")).write_bytes(b"half")
        print("stopped", flush=True)
        sys.stdin.read()  # wait here for the SIGKILL
    return real(*args, **kw)
setattr(g, point, stop_here)
sys.argv[0] = "prep"
from prep.cli import main
main()
"""


@pytest.mark.parametrize(("point", "after"), [("write_index", 3), ("write_wdinfo", 0)])
def test_killed_run_resumes_to_identical_files(tmp_path: Path, point: str, after: int) -> None:
    from typer.testing import CliRunner

    from prep.cli import app

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    make_shards(clean, [5, 5, 5, 5, 5, 3])
    shutil.copytree(clean, killed)
    args = ["run", "generate_wdinfo", "--set", "generate_wdinfo.tar_chunk_size=5", "-q"]
    cmd = [
        sys.executable,
        "-c",
        KILLER,
        point,
        str(after),
        *args,
        "--set",
        f"generate_wdinfo.input_dir={killed}",
    ]
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        line = proc.stdout.readline()  # the run reached the chosen point and waits there
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert line == "stopped\n" and proc.returncode == -signal.SIGKILL, err
    assert not (killed / "wdinfo.pkl").exists()
    if point == "write_index":
        assert len(list(killed.glob("*.idx"))) == after and len(list(killed.glob(".*.tmp-*"))) == 1
    runner = CliRunner()
    resumed = runner.invoke(app, [*args, "--json", "--set", f"generate_wdinfo.input_dir={killed}"])
    assert resumed.exit_code == 0, resumed.output
    doc = json.loads(resumed.stdout)
    assert (doc["skipped"], doc["done"]) == ((after, 6 - after) if point == "write_index" else (6, 0))
    assert runner.invoke(app, [*args, "--set", f"generate_wdinfo.input_dir={clean}"]).exit_code == 0
    assert dataset_files(killed) == dataset_files(clean)
    assert len(dataset_files(clean)) == 6 + 6 + 2 + 3  # shards, indexes, manifest + wdinfo, .nv-meta


def test_symlinked_shards_get_their_index_beside_the_link(tmp_path: Path) -> None:
    make_shards(tmp_path / "store", [2, 2])
    (tmp_path / "ds").mkdir()
    for name in ("shard-000.tar", "shard-001.tar"):
        (tmp_path / "ds" / name).symlink_to(tmp_path / "store" / name)
    assert run(tmp_path / "ds").ok
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.idx")) == [
        "shard-000.tar.idx",
        "shard-001.tar.idx",
    ]
    assert not list((tmp_path / "store").glob("*.idx")), "the linked-to folder is left alone"
    assert read_manifest(tmp_path / "ds").total_samples == 4


def test_users_energon_dataset_yaml_survives_a_rerun(tmp_path: Path) -> None:
    make_shards(tmp_path, [2])
    run(tmp_path)
    custom = (
        "sample_type:\n  __module__: megatron.energon\n  __class__: ImageSample\nfield_map:\n  image: jpg\n"
    )
    (tmp_path / ".nv-meta" / "dataset.yaml").write_text(custom)
    result = run(tmp_path, force=True)
    assert (tmp_path / ".nv-meta" / "dataset.yaml").read_text() == custom
    assert any("kept" in n and "dataset.yaml" in n for n in result.to_json()["notes"])
