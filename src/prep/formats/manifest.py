"""`manifest.json`: prep's own versioned index of a shard folder. JSON, never pickle.

It lists every shard (relative path, samples, bytes, checksum), the total, the fields (member
extensions, with dtype and shape for encodings), the encoders that made them, and the stage
history. It holds no timestamps, so re-running a stage gives the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.dataset_path import check_dataset_path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "prep-manifest"
MANIFEST_VERSION = 2  # 2: `checksum` (ALGORITHM:hex) replaced version 1's `sha256` (hex)
READABLE_VERSIONS = (1, 2)

BF16_STORAGE = "uint16-bits"  # a field's `storage`: bfloat16 kept as its bit patterns in uint16


def _canonical(value: Any) -> Any:
    """Nested dicts with sorted keys, so a manifest's bytes never depend on the order a stage (or a
    done-marker read back from disk) happened to build them in."""
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass(slots=True)
class ShardEntry:
    path: str  # relative to the manifest's folder, POSIX separators
    samples: int
    bytes: int
    checksum: str  # ALGORITHM:hex, see prep.formats.checksum


@dataclass(slots=True)
class Manifest:
    shards: list[ShardEntry]
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    chunk_size: int | None = None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "total_samples": self.total_samples,
            "chunk_size": self.chunk_size,
            "shards": [asdict(s) for s in self.shards],
            "fields": _canonical(self.fields),
            "encoders": _canonical(self.encoders),
            "history": _canonical(self.history),
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrepError(f"manifest is not valid JSON (line {err.lineno}: {err.msg})", where,
                            "regenerate it with `prep run generate_wdinfo`") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise PrepError("not a prep manifest (missing format: prep-manifest)", where,
                            "regenerate it with `prep run generate_wdinfo`")
        version = doc.get("version")
        if version not in READABLE_VERSIONS:
            raise PrepError(f"manifest version {version} is not supported (this prep reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))})", where,
                            "upgrade prep or regenerate the manifest")
        try:
            shards = [ShardEntry(str(s["path"]), int(s["samples"]), int(s["bytes"]),
                                 str(s["checksum"]) if version == 2 else f"sha256:{s['sha256']}")
                      for s in doc["shards"]]
        except (KeyError, TypeError, ValueError) as err:
            raise PrepError(f"manifest shard entry is malformed ({err})", where,
                            "regenerate it with `prep run generate_wdinfo`") from None
        for s in shards:
            check_dataset_path(s.path, "manifest shard path", where,
                               "use paths relative to the manifest's folder")
        m = cls(shards, doc.get("fields") or {}, doc.get("encoders") or {}, doc.get("history") or [],
                doc.get("chunk_size"))
        if doc.get("total_samples") != m.total_samples:
            raise PrepError(f"manifest total_samples {doc.get('total_samples')} != sum of shard samples "
                            f"{m.total_samples}", where, "regenerate it with `prep run generate_wdinfo`")
        return m


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    write_text_atomic(path, manifest.to_json())
    return path


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise PrepError("manifest.json not found", str(path),
                        "run `prep run generate_wdinfo` on this folder") from None
    return Manifest.from_json(text, str(path))
