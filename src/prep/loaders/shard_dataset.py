"""`ShardDataset`: WebDataset shards with a pure, seekable order and exact O(1) resume.

The leaf plans global batches from its cursor `(epoch, position)` in the main process (see
`prep.loaders.order`); DataLoader workers read each sample with one positioned read through the
`.idx` offsets, parse its members from memory and decode them. Because the order is a function of
(seed, epoch, shard list) only, it is the same for any number of workers (per-worker splitting, as in
webdataset or litdata, changes the order when `num_workers` changes), and the global batch stream is the
same for any world size, so a run resumes exactly on another number of ranks with the same global batch.

Epoch policy: every sample appears exactly once per epoch across all ranks. With `drop_last=False`
(default) the last global batch may be short and is split evenly over ranks by `rank_slice` (a rank can
get fewer samples, or none when the tail is smaller than the world size); nothing is padded or repeated.
With `drop_last=True` the short tail is skipped (it differs every epoch when shuffling) and
`dropped_per_epoch` says how many samples that is.
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from prep.errors import PrepError
from prep.loaders import skips
from prep.loaders.base import BatchDesc, Node, dist_info, rank_slice
from prep.loaders.decode import (
    Buffer,
    DecodeMode,
    Decoder,
    bytes_list,
    member_spans,
    parse_sample,
    shared_empty,
)
from prep.loaders.order import EpochOrder, batches_per_epoch
from prep.loaders.skips import BadSample, OnError
from prep.loaders.sources import Secret, ShardReader, ShardSpec, redact_url, resolve_shards


def _empty_bytes(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.uint8)


def _batch_bytes(n: int, keep: list[torch.Tensor]) -> np.ndarray:
    """A read buffer for a raw batch: a shared-memory slot in a worker (see `decode.bytes_list`)."""
    keep.append(shared_empty((n,), torch.uint8))
    return keep[-1].numpy()


DEFAULT_MAX_SKIP_FRACTION = 0.05  # more bad samples than this is a damaged dataset, not bad luck
Transform = Callable[[dict[str, Any]], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], Any]


def resolve_global_batch(
    batch_size: int, global_batch_size: int | None, rank: int | None, world_size: int | None
) -> tuple[int, int, int]:
    """(global batch, rank, world): the per-rank batch times the world size, unless given directly."""
    r, w = dist_info(rank, world_size)
    g = global_batch_size if global_batch_size is not None else batch_size * w
    if g < 1 or g % w:
        raise PrepError(
            f"global batch {g} is not a positive multiple of the world size {w}",
            "batch_size",
            "pick a global batch size that every world size you resume on divides",
        )
    return g, r, w


class SampleLeaf(Node):
    """A leaf whose epoch is a sequence of `total` positions mapped to sample references by `refs()`.

    The cursor is (epoch, position in samples); `next_batch` takes the next global batch of positions,
    `next_samples(n)` the next n (for mixing). Subclasses define `refs`, `load` and `fingerprint`.
    """

    def __init__(self, *, total: int, global_batch: int, rank: int, world: int, drop_last: bool) -> None:
        if total < 1:
            raise PrepError("the dataset has no samples", type(self).__name__, "check the source")
        self.total = total
        self.global_batch = global_batch
        self.rank = rank
        self.world = world
        self.drop_last = drop_last
        self.epoch = 0
        self.pos = 0

    # ------------------------------------------------------------------------------------ planning
    @abstractmethod
    def refs(self, epoch: int, start: int, stop: int) -> list[tuple[Any, ...]]:
        """Picklable references of the samples at epoch positions [start, stop)."""

    def _end_epoch(self) -> StopIteration:
        self.epoch, self.pos = self.epoch + 1, 0
        return StopIteration()

    def next_batch(self) -> BatchDesc:
        left = self.total - self.pos
        if left <= 0 or (self.drop_last and left < self.global_batch):
            raise self._end_epoch()
        start, stop = self.pos, min(self.total, self.pos + self.global_batch)
        items = tuple(self.refs(self.epoch, start, stop))
        self.pos = stop
        return BatchDesc(self.path, items, {"epoch": self.epoch, "start": start})

    def next_samples(self, n: int) -> list[Any]:
        """The next n sample references (for mixing). When fewer than n are left, the epoch ends like
        `next_batch`'s: StopIteration, cursor at (epoch + 1, 0), the leftover samples unused this epoch."""
        if self.total - self.pos < n:
            raise self._end_epoch()
        start, self.pos = self.pos, self.pos + n
        return self.refs(self.epoch, start, self.pos)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`. The current epoch is a no-op, so the usual `loader.set_epoch(e)` at the
        top of each epoch keeps a cursor restored mid-epoch (the rule every combinator follows)."""
        if int(epoch) != self.epoch:
            self.epoch, self.pos = int(epoch), 0

    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.total, self.global_batch, self.drop_last)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples skipped at the end of every epoch (the short tail, only with drop_last=True)."""
        return self.total % self.global_batch if self.drop_last else 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, pos = int(state["epoch"]), int(state["position"])
        if not 0 <= pos <= self.total:
            raise PrepError(
                f"saved position {pos} is outside an epoch of {self.total} samples",
                self.path or type(self).__name__,
                "resume with the dataset that saved the state",
            )
        self.epoch, self.pos = epoch, pos

    # ------------------------------------------------------------------------------------- loading
    def _check_world(self, world: int) -> None:
        if world != self.world:
            raise PrepError(
                f"the dataset planned for a world of {self.world} ranks, the loader runs {world}",
                self.path or type(self).__name__,
                "pass the same rank/world_size to both, or neither",
            )

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        self._check_world(world)
        with skips.leaf(self.path):
            return self.load_batch(desc.items[rank_slice(len(desc.items), rank, world)])

    @abstractmethod
    def load_batch(self, refs: Sequence[Any]) -> Any:
        """Load, decode and collate these references (runs in a worker)."""


class ShardDataset(SampleLeaf):
    """Deterministic, exactly resumable loader over WebDataset shards.

    Args:
        source: a prep shard folder (manifest.json or `.idx`), a `wdinfo.pkl` path (read only because it
            is named), a tar path, brace pattern or list of them, or URLs (`https://`, `hf://`, `s3://`
            through fsspec; `pipe:CMD` only with `allow_pipe=True`).
        batch_size: samples per rank per step; the global batch is `batch_size * world_size` (or pass
            `global_batch_size`). Rank and world come from torch.distributed, else RANK/WORLD_SIZE.
        shuffle, seed: shuffle shard order and samples inside windows of `window_shards` shards.
        decode: 'raw' (bytes), 'pil', 'uint8' (Bx3xHxW uint8) or 'float' (float32 in [0, 1]).
        image_size, crop: resize to cover (H, W) then crop 'center' or 'random' (seeded per sample/epoch).
        fields: member extensions to keep (`'jpg|png'` takes whichever exists, named 'jpg'); a sample
            missing one is an error that names it.
        transform: per-sample function on the decoded dict (runs in workers); collate: replaces collation.
        drop_last: see the module docstring for the exact-once policy.
        token: HTTP bearer token / hf token, sent only in headers; storage_options: passed to fsspec.
        on_error: 'skip' (default) drops a bad sample (corrupt image, missing or malformed member,
            unreadable record) from its batch and counts it (`DataLoader.stats()`, a warning at most once a
            minute); 'raise' stops at the first. max_skip_fraction: with 'skip', more distinct bad samples
            than this share of the dataset raise.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        decode: DecodeMode = "uint8",
        image_size: int | Sequence[int] | None = None,
        crop: str = "center",
        transform: Transform | None = None,
        fields: Sequence[str] | None = None,
        collate: Collate | None = None,
        drop_last: bool = False,
        window_shards: int = 16,
        global_batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        allow_pipe: bool = False,
        token: str | None = None,
        storage_options: dict[str, Any] | None = None,
        on_error: OnError = "skip",
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
    ) -> None:
        skips.check_policy(on_error, max_skip_fraction, "ShardDataset")
        self.on_error: OnError = on_error
        self.max_skip_fraction = float(max_skip_fraction)
        if window_shards < 1:
            raise PrepError(f"window_shards={window_shards} is below 1", "window_shards", "use 1 or more")
        secret = Secret(token) if token is not None else None
        self.shards: list[ShardSpec] = resolve_shards(
            source, allow_pipe=allow_pipe, token=secret, storage_options=storage_options
        )
        g, r, w = resolve_global_batch(batch_size, global_batch_size, rank, world_size)
        super().__init__(
            total=sum(s.samples for s in self.shards), global_batch=g, rank=r, world=w, drop_last=drop_last
        )
        self.shuffle = shuffle
        self.seed = int(seed)
        self.window_shards = int(window_shards)
        self.decoder = Decoder.make(decode, image_size, crop, fields, self.seed, on_error)
        self.transform = transform
        self.collate = collate
        self.reader = ShardReader(
            self.shards, token=secret, storage_options=storage_options, pipe_cache=self.window_shards + 1
        )
        self._order: EpochOrder | None = None
        self._names: list[str] | None = None

    def __repr__(self) -> str:
        return (
            f"ShardDataset({len(self.shards)} shards, {self.total} samples, "
            f"global_batch={self.global_batch}, shuffle={self.shuffle}, seed={self.seed}, "
            f"decode={self.decoder.mode!r})"
        )

    @property
    def order(self) -> EpochOrder:
        if self._order is None or self._order.path != self.path:
            self._order = EpochOrder(
                [s.samples for s in self.shards],
                seed=self.seed,
                path=self.path,
                shuffle=self.shuffle,
                window_shards=self.window_shards,
            )
        return self._order

    def refs(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Sample references (shard, sample in shard, epoch) of epoch positions [start, stop)."""
        shards, samples = self.order.lookup(epoch, start, stop)
        return [(i, j, epoch) for i, j in zip(shards.tolist(), samples.tolist(), strict=True)]

    def fingerprint(self) -> dict[str, Any]:
        listing = json.dumps(
            [[s.name, s.samples] + ([s.checksum] if s.checksum else []) for s in self.shards]
        ).encode()
        return {
            "type": "ShardDataset",
            "shards": hashlib.sha256(listing).hexdigest()[:16],
            "n_shards": len(self.shards),
            "samples": self.total,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window_shards": self.window_shards,
            "drop_last": self.drop_last,
        }

    # ------------------------------------------------------------------------------------- loading
    def _where(self, i: int, j: int) -> str:
        if self._names is None:  # redacted once: this runs for every sample
            self._names = [redact_url(s.url) for s in self.shards]
        return f"{self._names[i]} sample {j}"

    def _parsed(
        self, refs: Sequence[tuple[int, int, int]], keep_places: bool = False
    ) -> list[tuple[str, dict[str, Buffer], str, int] | None]:
        """(key, members, where, epoch) per reference; a bad record is skipped (None with keep_places)."""
        buf, spans = self.reader.read_into([(i, j) for i, j, _ in refs], _empty_bytes)
        mv = memoryview(buf)
        out = []
        for (i, j, epoch), (a, b) in zip(refs, spans, strict=True):
            where = self._where(i, j)
            try:
                key, members = parse_sample(mv[a:b], where)
            except BadSample as err:
                skips.skip_or_raise(err, self.on_error, f"sample {j}")
                if keep_places:
                    out.append(None)
                continue
            out.append((key, members, f"{where} (key {key!r})", epoch))
        return out

    def _raw_batch(self, refs: Sequence[tuple[int, int, int]]) -> dict[str, Any] | None:
        """decode='raw' without hooks: lists of member bytes straight from the read buffer (the hot path of
        byte-level pipelines, so it skips the per-value machinery). None for an unusual tar layout."""
        slot: list[torch.Tensor] = []
        buf, spans = self.reader.read_into([(i, j) for i, j, _ in refs], lambda n: _batch_bytes(n, slot))
        mv = memoryview(buf)
        keys: list[str] = []
        where_from: dict[str, list[int]] = {}
        out: dict[str, Any] = {"__key__": keys}
        fields: list[str] | None = None
        parsed: list[tuple[str, dict[str, tuple[int, int]], str] | BadSample] = []
        for (i, j, _), (a, b) in zip(refs, spans, strict=True):  # all first: an unusual layout anywhere
            where = self._where(i, j)  # hands the whole batch to the slow path
            try:
                got = member_spans(mv[a:b], where)
            except BadSample as err:
                err.key = err.key or f"sample {j}"
                parsed.append(err)
                continue
            if got is None:
                return None
            parsed.append((*got, where))
        for (a, _), item in zip(spans, parsed, strict=True):
            if isinstance(item, BadSample):
                skips.skip_or_raise(item, self.on_error, item.key or "")
                continue
            key, found, where = item
            try:
                chosen = self.decoder.select(key, found, f"{where} (key {key!r})")
            except BadSample as err:
                skips.skip_or_raise(err, self.on_error, key)
                continue
            if fields is None:
                fields = list(chosen)
                out.update({f: [] for f in fields})
                where_from = {f: [] for f in fields}
            elif len(chosen) != len(fields) or any(f not in chosen for f in fields):
                raise PrepError(
                    f"sample {key!r} has members {sorted(chosen)}, the batch's first has {sorted(fields)}",
                    where,
                    "pass fields=[...] so every sample yields the same members",
                )
            keys.append(key)
            for f in fields:
                x, y = chosen[f]
                out[f].append(mv[a + x : a + y].tobytes())
                where_from[f] += (a + x, a + y)
        for f in fields or ():
            out[f] = bytes_list(slot[0], out[f], where_from[f])
        return out

    def load_batch(self, refs: Sequence[Any]) -> Any:
        if self.decoder.mode == "raw" and self.transform is None and self.collate is None and refs:
            batch = self._raw_batch(refs)
            if batch is not None:
                return batch
        return self.decoder.decode_batch(self._parsed(refs), self.transform, self.collate)

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any]]:
        with skips.leaf(self.path):
            selected: list[tuple[str, dict[str, Buffer], str, int] | None] = []
            for item in self._parsed(refs, keep_places=True):
                if item is not None:
                    k, m, w, e = item
                    try:
                        item = (k, self.decoder.select(k, m, w), w, e)
                    except BadSample as err:
                        skips.skip_or_raise(err, self.on_error, k)
                        item = None
                selected.append(item)
            return self.decoder.finish_all(selected, self.transform, keep_places=True)
