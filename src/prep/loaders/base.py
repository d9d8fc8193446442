"""The loader tree's protocol: plan batches in the main process, load them in workers.

Every dataset (leaf or combinator) is a `Node`. Planning (`next_batch`, `next_samples`) is cheap, pure
given the node's cursor, and runs in the main process; it produces a `BatchDesc` that names samples,
not bytes. Loading (`fetch`, `fetch_samples`) does the I/O and runs in DataLoader workers. Because the
order never depends on workers, the state is just the cursors of the tree after the last batch the
trainer received: restoring it is O(1), exact, and independent of the worker count.

Batches are *global*: a node plans `global_batch_size` samples per batch (per-rank batch size x world
size), and `fetch(desc, rank, world)` loads only that rank's slice. The global stream never depends on
the world size, so a run saved on W ranks resumes on W' ranks (same global batch) exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prep.errors import PrepError

# 2: random streams hash their counters into the key (states of 1 would resume into another order)
STATE_VERSION = 2


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit arguments, else torch.distributed when initialised, else the
    RANK/WORLD_SIZE environment (torchrun sets them), else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = rank, world_size
    else:
        r, w = 0, 1
        try:
            import torch.distributed as td

            if td.is_available() and td.is_initialized():
                r, w = td.get_rank(), td.get_world_size()
            else:
                r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ImportError:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        r = rank if rank is not None else r
        w = world_size if world_size is not None else w
    if w < 1 or not 0 <= r < w:
        raise PrepError(f"rank {r} is not in a world of size {w}", "loader", "check RANK and WORLD_SIZE")
    return r, w


def _stream_digest(seed: int, path: str, purpose: str, counters: Sequence[int], size: int) -> int:
    """`size` bytes of a hash of every input of a stream, as an integer. The inputs are JSON-encoded, so
    no two different tuples hash the same text (a path or a sample key may hold any character)."""
    text = json.dumps([int(seed), path, purpose, *(int(c) for c in counters)], ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "little")


def stream_key(seed: int, path: str, purpose: str, *counters: int) -> int:
    """A 64-bit number drawn from (seed, path, purpose, counters) (e.g. a per-sample crop position)."""
    return _stream_digest(seed, path, purpose, counters, 8)


def counter_rng(seed: int, path: str, purpose: str, *counters: int) -> np.random.Generator:
    """An independent generator for (seed, tree path, purpose, counters): all of them are hashed into
    Philox's 128-bit key and the counter starts at 0, so any position of any stream is computed directly,
    without replay, and two different inputs (say epochs e and e+1) share no stretch of numbers.
    (Putting the counters in Philox's counter instead made epoch e+1's stream epoch e's shifted by one
    block: successive epochs were nearly the same order.)"""
    return np.random.Generator(np.random.Philox(key=_stream_digest(seed, path, purpose, counters, 16)))


def check_state_version(version: Any, where: str) -> None:
    """Refuse a loader state of another format; an older one says why it cannot resume here."""
    if version == STATE_VERSION:
        return
    if isinstance(version, int) and version < STATE_VERSION:
        raise PrepError(
            f"loader state version {version} was saved by an older prep, whose random streams (shuffles, "
            f"blend and mix choices) differ from this version's ({STATE_VERSION}): it would resume into "
            "another order", where, "resume with the prep version that saved it, or start the loader fresh")
    raise PrepError(f"loader state version {version!r} is not {STATE_VERSION}", where,
                    "resume with the prep version that saved it")


@dataclass(frozen=True, slots=True)
class BatchDesc:
    """A planned global batch. `node` is the path of the node whose `fetch` loads it; `items` are that
    node's picklable sample references in global order; `info` is small metadata carried to the batch."""

    node: str
    items: tuple[Any, ...]
    info: dict[str, Any] = field(default_factory=dict)


def rank_slice(n: int, rank: int, world: int) -> slice:
    """Rank r's contiguous part of a global batch of n items (even split; the first n % world ranks get
    one more when n is not divisible, as happens only for a final short batch with drop_last=False)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class Node(ABC):
    """A dataset in the loader tree. Subclasses keep a cursor, plan from it, and load in workers."""

    path: str = ""

    # -------------------------------------------------------------------------------------- tree
    def children(self) -> Sequence[Node]:
        return ()

    def bind(self, path: str = "") -> None:
        """Give every node of the subtree its path (root "", children "0", "0/1", ...)."""
        self.path = path
        for i, child in enumerate(self.children()):
            child.bind(f"{path}/{i}" if path else str(i))

    def nodes(self) -> dict[str, Node]:
        out = {self.path: self}
        for c in self.children():
            out.update(c.nodes())
        return out

    # ---------------------------------------------------------------------------------- planning
    @abstractmethod
    def next_batch(self) -> BatchDesc:
        """Plan the next global batch and advance the cursor. Raise StopIteration at the end of the
        epoch (the cursor then points at the start of the next epoch)."""

    def next_samples(self, n: int) -> list[Any]:
        """Plan the next n sample references (for mixing inside a batch). Raise StopIteration when the
        epoch has fewer than n left."""
        raise PrepError(f"{type(self).__name__} cannot be mixed inside a batch", self.path or "loader",
                        "mix shard or local datasets (or concats of them)")

    def set_epoch(self, epoch: int) -> None:
        for c in self.children():
            c.set_epoch(epoch)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This node's cursor plus its children's, as JSON-able data."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor (O(1): no replay)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What decides the order (data, sizes, weights, seeds), to refuse a state from another setup."""

    def batches_per_epoch(self) -> int | None:
        return None

    # ----------------------------------------------------------------------------------- loading
    @abstractmethod
    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        """Load and collate rank's slice of a batch this node planned (runs in a worker)."""

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any] | None]:
        """Load samples (decoded and transformed, not collated) for the given references: one entry per
        reference, None where a bad sample was skipped (whoever collates drops those)."""
        raise PrepError(f"{type(self).__name__} cannot be mixed inside a batch", self.path or "loader",
                        "mix shard or local datasets")


def fingerprint_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_fingerprints(old: Any, new: Any, path: str = "") -> list[str]:
    """Human lines saying what changed between two fingerprints (for the mismatch error): the dotted path
    of each changed value at any depth (`children.1.seed: 1 -> 2`) and both values, whole."""
    where = path or "value"
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{p} added")
            elif k not in new:
                out.append(f"{p} removed")
            else:
                out += diff_fingerprints(old[k], new[k], p)
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = [f"{where}: {len(old)} items -> {len(new)}"] if len(old) != len(new) else []
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            out += diff_fingerprints(a, b, f"{path}.{i}" if path else str(i))
        return out
    if old != new:
        return [f"{where}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]
    return []
