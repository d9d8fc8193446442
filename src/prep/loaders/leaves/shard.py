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
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prep.errors import PrepError
from prep.loaders import skips
from prep.loaders.base import (
    DEFAULT_MAX_SKIP_FRACTION,
    BatchDesc,
    Collate,
    SampleLeaf,
    Span,
    Transform,
    rank_slice,
    resolve_global_batch,
)
from prep.loaders.io.cache import ShardCache
from prep.loaders.io.decode import DecodeMode, Decoder, Parsed
from prep.loaders.io.members import Buffer, batch_member_spans, parse_sample
from prep.loaders.io.retry import RetryPolicy
from prep.loaders.io.shm import bytes_list, shared_empty
from prep.loaders.io.sources import (
    Secret,
    ShardReader,
    ShardSpec,
    hub_urls,
    redact_url,
    resolve_shards,
    source_items,
)
from prep.loaders.order import EpochOrder
from prep.loaders.skips import BadSample, OnError

DEFAULT_CACHE_BYTES = 32 << 30  # a shard cache's default limit: 32 GiB


# a batch as read: a view of the buffer, each sample's (start, end) in it, each one's members
_Read = tuple[memoryview, list[tuple[int, int]], list[Any]]


def _empty_bytes(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.uint8)


def _batch_bytes(n: int, keep: list[torch.Tensor]) -> np.ndarray:
    """A read buffer for a raw batch: a shared-memory slot in a worker (see `decode.bytes_list`)."""
    keep.append(shared_empty((n,), torch.uint8))
    return keep[-1].numpy()


class ShardDataset(SampleLeaf):
    """Deterministic, exactly resumable loader over WebDataset shards.

    Args:
        source: a prep shard folder (manifest.json or `.idx`), a `wdinfo.pkl` path (read only because it
            is named), a tar path, brace pattern or list of them, or URLs (`https://`, `hf://`, `s3://`
            through fsspec; `pipe:CMD` only with `allow_pipe=True`).
        batch_size: samples per rank per step; the global batch is `batch_size * world_size` (or pass
            `global_batch_size`). Rank and world come from torch.distributed, else RANK/WORLD_SIZE.
        shuffle, seed: shuffle shard order and samples inside windows of `window_shards` shards.
        decode: 'uint8' (default: Bx3xHxW uint8 batches in channels_last memory, decoded straight into
            shared memory), 'float' (the same as float32 in [0, 1]), 'pil' or 'raw' (bytes).
        image_size, crop: resize to cover (H, W) then crop 'center' or 'random' (seeded per sample/epoch).
        fields: member extensions to keep (`'jpg|png'` takes whichever exists, named 'jpg'); a sample
            missing one is an error that names it.
        transform: per-sample function on the decoded dict (runs in workers); collate: replaces collation.
        drop_last: see the module docstring for the exact-once policy.
        token: HTTP bearer token / hf token, sent only in headers; storage_options: passed to fsspec.
        cache_dir, cache_bytes: read remote and `pipe:` shards through a shard cache in this folder, shared
            by every worker and rank of the node, holding at most `cache_bytes` (see docs/loaders.md). Each
            worker downloads whole shards ahead of use, `read_ahead` of them (default: four windows) in the
            order its rank will read them. Without cache_dir, remote samples are ranged reads.
        retry: how remote reads that fail transiently (5xx, 408, 425, 429, timeouts, cut connections) are
            tried again: a `RetryPolicy` (default 5 retries, backoff from 0.5 s doubling to at most 30 s,
            with jitter; a 60 s silent connection is a timeout); `RetryPolicy(retries=0)` fails at once.
            Retries are counted in `DataLoader.stats()["retries"]`.
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
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_ahead: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        skips.check_policy(on_error, max_skip_fraction, "ShardDataset")
        self.on_error: OnError = on_error
        self.max_skip_fraction = float(max_skip_fraction)
        if window_shards < 1:
            raise PrepError(f"window_shards={window_shards} is below 1", "window_shards", "use 1 or more")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise PrepError(f"retry={retry!r} is not a RetryPolicy", "ShardDataset(retry=...)",
                            "pass retry=RetryPolicy(retries=5, base_delay=0.5, max_delay=30.0)")
        self.retry = retry if retry is not None else RetryPolicy()
        secret = Secret(token) if token is not None else None
        items = source_items(source)
        if storage_options is None:  # hf:// read at the hub's https URLs (with storage_options: HfFileSystem)
            items, secret = hub_urls(items, secret)
        self.shards: list[ShardSpec] = resolve_shards(
            items, allow_pipe=allow_pipe, token=secret, storage_options=storage_options, retry=self.retry
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
        cache = ShardCache(cache_dir, cache_bytes) if cache_dir is not None else None
        self.read_ahead = 4 * self.window_shards if read_ahead is None else max(0, int(read_ahead))
        self.reader = ShardReader(
            self.shards, token=secret, storage_options=storage_options, pipe_cache=self.window_shards + 1,
            cache=cache, retry=self.retry,
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
    def _shard_names(self) -> list[str]:
        """Each shard as errors name it (redacted once: samples are named by it all the time)."""
        if self._names is None:
            self._names = [redact_url(s.url) for s in self.shards]
        return self._names

    def _where(self, i: int, j: int) -> str:
        return f"{self._shard_names()[i]} sample {j}"

    def _read(self, refs: Sequence[tuple[int, int, int]]) -> _Read:
        """The samples' bytes in one buffer (a view of it), each one's (start, end) there, and its members
        (`batch_member_spans`)."""
        buf, spans = self.reader.read_into([(i, j) for i, j, _ in refs], _empty_bytes)
        mv = buf.data
        return mv, spans, batch_member_spans(mv, spans, lambda k: self._where(refs[k][0], refs[k][1]))

    def _parsed(
        self, refs: Sequence[tuple[int, int, int]], keep_places: bool = False,
        read: _Read | None = None,
    ) -> list[Parsed | None]:
        """(key, members, where, epoch) per reference (read now, or given as `_read` gave it); a bad record
        is skipped (None with keep_places)."""
        mv, spans, found = self._read(refs) if read is None else read
        out: list[Parsed | None] = []
        names = self._shard_names()
        members: dict[str, Buffer]
        for (i, j, epoch), (a, b), got in zip(refs, spans, found, strict=True):
            if type(got) is tuple:
                key, members = got[0], {ext: mv[x:y] for ext, (x, y) in got[1].items()}
            else:
                try:
                    if isinstance(got, PrepError):
                        raise got  # a BadSample is skipped below; an unsafe member name stops the batch
                    key, members = parse_sample(mv[a:b], self._where(i, j))  # an unusual layout: the scanner
                except BadSample as err:
                    skips.skip_or_raise(err, self.on_error, f"sample {j}")
                    if keep_places:
                        out.append(None)
                    continue
            out.append((key, members, f"{names[i]} sample {j} (key {key!r})", epoch))
        return out

    def _raw_batch(self, refs: Sequence[tuple[int, int, int]]) -> dict[str, Any] | None:
        """decode='raw' without hooks: lists of member bytes straight from the read buffer (the hot path of
        byte-level pipelines, so it skips the per-value machinery). None for an unusual tar layout."""
        slot: list[torch.Tensor] = []
        buf, spans = self.reader.read_into([(i, j) for i, j, _ in refs], lambda n: _batch_bytes(n, slot))
        mv = buf.data
        keys: list[str] = []
        where_from: dict[str, list[int]] = {}
        out: dict[str, Any] = {"__key__": keys}
        fields: list[str] | None = None
        parsed = batch_member_spans(mv, spans, lambda k: self._where(refs[k][0], refs[k][1]))
        for got in parsed:  # in order: an unusual layout means the slow path, an unsafe name raises
            if got is None:
                return None
            if isinstance(got, PrepError) and not isinstance(got, BadSample):
                raise got
        for (i, j, _), item in zip(refs, parsed, strict=True):
            if isinstance(item, BadSample):
                skips.skip_or_raise(item, self.on_error, item.key or f"sample {j}")
                continue
            assert isinstance(item, tuple)  # the loop above returned or raised for the rest
            key, found = item
            where = self._where(i, j)
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
                out[f].append(mv[x:y].tobytes())
                where_from[f] += (x, y)
        for f in fields or ():
            out[f] = bytes_list(slot[0], out[f], where_from[f])
        return out

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        """Load rank's slice; with a cache, first queue the shards this rank reads next for download."""
        span = desc.items
        if self.reader.cache is not None and self.read_ahead and isinstance(span, Span):
            at = span.start + rank_slice(len(span), rank, world).start
            self.reader.prefetch(self.order.upcoming(span.epoch, at, self.global_batch, self.read_ahead))
        return super().fetch(desc, rank, world)

    def load_batch(self, refs: Sequence[Any]) -> Any:
        if self.decoder.mode == "raw" and self.transform is None and self.collate is None and refs:
            batch = self._raw_batch(refs)
            if batch is not None:
                return batch
        read = self._read(refs)
        if self.transform is None and self.collate is None:
            batch = self.decoder.plain_batch(read[0], read[2])
            if batch is not None:
                return batch
        return self.decoder.decode_batch(self._parsed(refs, read=read), self.transform, self.collate)

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any] | None]:
        with skips.leaf(self.path):
            selected: list[Parsed | None] = []
            for item in self._parsed(refs, keep_places=True):
                if item is not None:
                    k, m, w, e = item
                    try:
                        item = (k, self.decoder.select(k, m, w), w, e)
                    except BadSample as err:
                        skips.skip_or_raise(err, self.on_error, k)
                        item = None
                selected.append(item)
            return self.decoder.finish_all(selected, self.transform)
