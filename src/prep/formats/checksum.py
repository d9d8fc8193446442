"""Shard checksums: `ALGORITHM:hex`, so a manifest or marker says how to check what it records.

prep records XXH3-128. The manifest is not signed, so a cryptographic hash guards against nothing a
128-bit non-cryptographic one does not: both catch a flipped bit, a truncated copy or a swapped shard.
SHA-256 runs at ~1.5-1.8 GB/s a core here, slower than repacking copies bytes, so it alone would cap
every stage that writes shards; XXH3 runs at >10 GB/s. `sha256:` values (manifest version 1) are still
checked.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import xxhash

from prep.errors import PrepError

ALGORITHM = "xxh3_128"
_CHUNK = 1 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = ALGORITHM) -> Hasher:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise PrepError(f"unknown checksum algorithm {algorithm!r}", None,
                    "expected xxh3_128 or sha256: regenerate the manifest with this prep")


def checksum_of(hasher: Hasher, algorithm: str = ALGORITHM) -> str:
    return f"{algorithm}:{hasher.hexdigest()}"


def file_checksum(path: str | os.PathLike[str], algorithm: str = ALGORITHM) -> str:
    h = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return checksum_of(h, algorithm)


def file_matches(path: str | os.PathLike[str], recorded: str) -> bool:
    """Whether the file's bytes give the recorded `ALGORITHM:hex` checksum (by that algorithm)."""
    algorithm, sep, _ = recorded.partition(":")
    if not sep:
        raise PrepError(f"checksum {recorded!r} does not name its algorithm", str(path),
                        "expected ALGORITHM:hex, e.g. xxh3_128:...; regenerate the manifest")
    return file_checksum(path, algorithm) == recorded
