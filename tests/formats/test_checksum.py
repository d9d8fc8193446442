"""Checksums name their algorithm: prep writes xxh3_128, and still verifies version-1 `sha256:` values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import xxhash

from prep.errors import PrepError
from prep.formats.checksum import ALGORITHM, file_checksum, file_matches


def test_checksums_name_their_algorithm_and_match_the_libraries(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # more than one read chunk
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    assert ALGORITHM == "xxh3_128"
    assert file_checksum(path) == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    assert file_checksum(path, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert file_matches(path, file_checksum(path))
    assert file_matches(path, "sha256:" + hashlib.sha256(data).hexdigest())  # a version-1 manifest's value
    path.write_bytes(data[:-1] + b"\x00")
    assert not file_matches(path, "xxh3_128:" + xxhash.xxh3_128(data).hexdigest())


@pytest.mark.parametrize(("recorded", "message"), [("md5:abc", "unknown checksum algorithm 'md5'"),
                                                   ("ab" * 32, "does not name its algorithm")])
def test_unknown_or_unnamed_algorithms_are_clear_errors(tmp_path: Path, recorded: str, message: str) -> None:
    path = tmp_path / "shard.tar"
    path.write_bytes(b"x")
    with pytest.raises(PrepError, match=message):
        file_matches(path, recorded)
