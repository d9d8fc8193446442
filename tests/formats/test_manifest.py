"""`manifest.json`: versioned JSON round trip, no timestamps (same input -> same bytes), and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prep.errors import PrepError
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest


def sample_manifest() -> Manifest:
    return Manifest(
        shards=[
            ShardEntry("a/shard-000.tar", 1000, 123456, "xxh3_128:" + "ab" * 16),
            ShardEntry("shard-001.tar", 17, 9999, "xxh3_128:" + "cd" * 16),
        ],
        fields={"jpg": {"samples": 1017}, "vae.npy": {"dtype": "float16", "shape": [4, 32, 32]}},
        encoders={"vae": {"class": "AutoencoderKL", "scaling_factor": 0.18215}},
        history=[{"stage": "reorganize_tar", "tar_chunk_size": 1000}],
        chunk_size=1000,
    )


def test_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    m = sample_manifest()
    path = write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m and back.total_samples == 1017
    first = path.read_bytes()
    write_manifest(tmp_path, read_manifest(tmp_path))
    assert path.read_bytes() == first
    doc = json.loads(first)
    assert doc["format"] == "prep-manifest" and doc["version"] == 2 and doc["total_samples"] == 1017
    assert doc["shards"][0] == {
        "path": "a/shard-000.tar",
        "samples": 1000,
        "bytes": 123456,
        "checksum": "xxh3_128:" + "ab" * 16,
    }


def test_version_1_manifests_are_read_with_sha256_checksums(tmp_path: Path) -> None:
    doc = json.loads(sample_manifest().to_json())
    doc["version"] = 1
    for s in doc["shards"]:
        s["sha256"] = "ef" * 32
        del s["checksum"]
    _write(tmp_path, doc)
    assert [s.checksum for s in read_manifest(tmp_path).shards] == ["sha256:" + "ef" * 32] * 2


def _write(tmp_path: Path, doc: object) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.update(format="other"), "not a prep manifest"),
        (lambda d: d.update(total_samples=5), "total_samples 5"),
        (lambda d: d["shards"][0].pop("checksum"), "malformed"),
        (lambda d: d["shards"][0].update(path="../escape.tar"), "leaves the dataset folder"),
        (lambda d: d["shards"][0].update(path="/abs.tar"), "leaves the dataset folder"),
    ],
)
def test_refusals_name_the_file(tmp_path: Path, mutate, message: str) -> None:
    doc = json.loads(sample_manifest().to_json())
    mutate(doc)
    _write(tmp_path, doc)
    with pytest.raises(PrepError, match=message) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in err.value.line()


def test_invalid_json_and_missing(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match="not found"):
        read_manifest(tmp_path)
    _write(tmp_path, '{"format": "prep-manifest",\n  oops}')
    with pytest.raises(PrepError, match="line 2"):
        read_manifest(tmp_path)


def test_nested_key_order_never_changes_the_bytes():
    """A stage re-run rebuilds fields/encoders from done-markers whose key order differs; same bytes."""
    from prep.formats.manifest import Manifest, ShardEntry

    shards = [ShardEntry("000000.tar", 3, 10240, "0" * 64)]
    a = Manifest(shards, {"vae.npy": {"dtype": "float32", "shape": [4, 8, 8]}},
                 {"vae": {"model": "m", "settings": {"resolution": 64, "dtype": "float32"}}},
                 [{"stage": "precache_encodings", "keep_source": False}])
    b = Manifest(shards, {"vae.npy": {"shape": [4, 8, 8], "dtype": "float32"}},
                 {"vae": {"settings": {"dtype": "float32", "resolution": 64}, "model": "m"}},
                 [{"keep_source": False, "stage": "precache_encodings"}])
    assert a.to_json() == b.to_json()


def test_atomic_write_leaves_an_unchanged_file_alone(tmp_path):
    import os

    from prep.formats.atomic import write_bytes_atomic

    path = tmp_path / "wdinfo.pkl"
    write_bytes_atomic(path, b"same")
    os.utime(path, ns=(1, 1))
    write_bytes_atomic(path, b"same")
    assert path.stat().st_mtime_ns == 1  # not rewritten
    write_bytes_atomic(path, b"new!")
    assert path.read_bytes() == b"new!" and path.stat().st_mtime_ns != 1
    assert [p.name for p in tmp_path.iterdir()] == ["wdinfo.pkl"]  # no temp left behind


def test_a_failed_atomic_write_names_its_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """A full disk fails the write itself, which names no file: the error names the file being
    written (the CLI then prints it with its fix), and the temp file is gone."""
    import errno
    import os

    from prep.errors import unexpected_line
    from prep.formats.atomic import write_bytes_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    path = tmp_path / "summary.json"
    with pytest.raises(OSError) as info:
        write_bytes_atomic(path, b"{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in unexpected_line(info.value) and "fix: free space" in unexpected_line(info.value)
    assert list(tmp_path.iterdir()) == []
