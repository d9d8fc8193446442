"""Chunked iteration: train on chunks of N batches, validate after each, and cycle through everything.

`limit_train_batches=N` shows a trainer the first N batches of a fresh shuffle every epoch, so over many
epochs some samples are seen many times and others never. Chunking instead walks one seeded order:
chunk k is the k-th window of it, and after ceil(size/N) chunks every sample was trained on once.

- Map-style datasets (`len` + `__getitem__`): `ChunkedSampler` yields the k-th window of one seeded
  permutation per pass (a pass's last chunk may be short; the next pass reshuffles).
- prep dataset trees (`Node`): a chunk is the window [kN, (k+1)N) of the global batch stream, which
  runs on across epoch boundaries.

`ChunkedDataLoader` wraps both; `resolve_chunk_config` is the one place where `train_chunk_size`,
`val_chunk_size` and `limit_*_batches` are reconciled. Resume is a fast-forward: the loader restarts at
the saved (chunk, batch) without loading the skipped batches, and its batch counter includes them, so
logging and checkpoint intervals stay aligned.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data as tud

from prep.errors import PrepError
from prep.loaders.base import STATE_VERSION, Node, check_state_version, counter_rng, dist_info, rank_slice
from prep.loaders.dataloader import DataLoader, private_generator

Limit = int | float | None


# ------------------------------------------------------------------------------ config resolution
@dataclass(frozen=True)
class ChunkPlan:
    """What a trainer should do: chunk sizes in batches (None = not chunked) and the limits to apply."""

    chunked: bool
    train_chunk_size: int | None
    val_chunk_size: int | None
    limit_train_batches: Limit
    limit_val_batches: Limit
    notes: tuple[str, ...] = ()


def _check_size(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrepError(
            f"{key}={value!r} is not a positive number of batches",
            key,
            f"set {key} to an integer >= 1, or leave it unset",
        )
    return value


def resolve_chunk_config(
    *,
    train_chunk_size: int | None = None,
    val_chunk_size: int | None = None,
    limit_train_batches: Limit = None,
    limit_val_batches: Limit = None,
    train_batches: int | None = None,
    val_batches: int | None = None,
) -> ChunkPlan:
    """Reconcile chunk sizes and batch limits (all counts in batches; `*_batches` = partition sizes).

    1. Neither chunk size set: standard behaviour, `limit_*_batches` returned unchanged.
    2. Either set: chunking is on for both partitions.
    3. The missing one is inferred from its partition size (the whole partition per chunk); an
       unknown partition size is an error.
    4. A chunk size beats the matching `limit_*_batches`, which is dropped (with a note).
    5. A chunk larger than its partition is cut to the partition size (with a note).
    """
    train = _check_size(train_chunk_size, "train_chunk_size")
    val = _check_size(val_chunk_size, "val_chunk_size")
    sizes = {
        "train": _check_size(train_batches, "train_batches"),
        "val": _check_size(val_batches, "val_batches"),
    }
    if train is None and val is None:
        return ChunkPlan(False, None, None, limit_train_batches, limit_val_batches)
    notes: list[str] = []
    chunks = {"train": train, "val": val}
    limits = {"train": limit_train_batches, "val": limit_val_batches}
    for part in ("train", "val"):
        size = sizes[part]
        if chunks[part] is None:
            if size is None:
                raise PrepError(
                    f"{part}_chunk_size is unset and the {part} partition's size is unknown",
                    f"{part}_chunk_size",
                    f"set {part}_chunk_size, or give a {part} loader with a length",
                )
            chunks[part] = size
            notes.append(f"{part}_chunk_size inferred as {size} (the whole {part} partition)")
        elif size is not None and chunks[part] > size:  # type: ignore[operator]
            notes.append(f"{part}_chunk_size {chunks[part]} cut to the {part} partition's {size} batches")
            chunks[part] = size
        if limits[part] is not None:
            notes.append(
                f"{part}_chunk_size={chunks[part]} takes precedence over limit_{part}_batches={limits[part]}"
            )
    return ChunkPlan(True, chunks["train"], chunks["val"], None, None, tuple(notes))


def limit_to_batches(limit: Limit, n: int) -> int:
    """Lightning's convention: an int is a batch count, a float in [0, 1] a fraction of n."""
    if limit is None:
        return n
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0:
        raise PrepError(
            f"limit_batches={limit!r} is neither a batch count nor a fraction",
            "limit_batches",
            "pass an int >= 0 or a float in [0, 1]",
        )
    if isinstance(limit, float):
        if limit > 1:
            raise PrepError(
                f"limit_batches={limit} is a float above 1",
                "limit_batches",
                "pass a fraction in [0, 1] or an integer batch count",
            )
        return int(n * limit)
    return min(limit, n)


# --------------------------------------------------------------------------------- map-style sampler
class ChunkedSampler(tud.Sampler[int]):
    """Indices of chunk k: window k % per_pass of pass k // per_pass's seeded permutation.

    `set_chunk(k)` jumps in O(1) (plus one permutation per pass). `set_epoch(e)` selects chunk e,
    because a chunked trainer's epoch is one chunk (frameworks call set_epoch every epoch); both keep
    a restored mid-chunk offset when the chunk does not change. Iterating to the end of a chunk moves
    to the next one. `state_dict()` counts indices handed out; with prefetching that can run ahead of
    what the model consumed — `ChunkedDataLoader` keeps the exact count.

    On several ranks (`rank`/`world_size`, default torch.distributed or RANK/WORLD_SIZE) each rank takes
    every world-th index of the chunk, as DistributedSampler does, so consecutive per-rank batches of B
    form the global batches of B x world; a chunk that does not divide is padded from its own start
    so that every rank gets the same count (at most world-1 repeats per chunk).
    """

    def __init__(
        self,
        dataset_size: int,
        chunk_size: int,
        seed: int = 42,
        shuffle: bool = True,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        for key, v in (("dataset_size", dataset_size), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PrepError(
                    f"{key}={v!r} must be a positive integer", "ChunkedSampler", f"pass a valid {key}"
                )
        self.dataset_size = dataset_size
        self.chunk_size = min(chunk_size, dataset_size)
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world = dist_info(rank, world_size)
        self.chunk = 0
        self.offset = 0
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def chunks_per_pass(self) -> int:
        return -(-self.dataset_size // self.chunk_size)

    def permutation(self, p: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != p:
            n = self.dataset_size
            perm = (
                counter_rng(self.seed, "chunked", "pass", p).permutation(n) if self.shuffle else np.arange(n)
            )
            self._perm = (p, perm)
        return self._perm[1]

    def chunk_indices(self, k: int) -> np.ndarray:
        p, j = divmod(k, self.chunks_per_pass)
        return self.permutation(p)[j * self.chunk_size : (j + 1) * self.chunk_size]

    def rank_indices(self, k: int) -> np.ndarray:
        """This rank's indices of chunk k (all of them on one rank)."""
        idx = self.chunk_indices(k)
        if self.world == 1:
            return idx
        per_rank = -(-len(idx) // self.world)
        return np.resize(idx, per_rank * self.world)[self.rank :: self.world]  # resize repeats from the start

    def chunk_length(self, k: int) -> int:
        j = k % self.chunks_per_pass
        return min(self.chunk_size, self.dataset_size - j * self.chunk_size)

    def set_chunk(self, chunk: int) -> None:
        if chunk < 0:
            raise PrepError(
                f"chunk {chunk} is negative", "ChunkedSampler.set_chunk", "pass a chunk index >= 0"
            )
        if chunk != self.chunk:
            self.chunk, self.offset = chunk, 0

    def set_epoch(self, epoch: int) -> None:
        self.set_chunk(epoch)

    def __iter__(self) -> Iterator[int]:
        for i in self.rank_indices(self.chunk)[self.offset :].tolist():
            self.offset += 1
            yield i
        self.chunk, self.offset = self.chunk + 1, 0

    def __len__(self) -> int:
        return -(-self.chunk_length(self.chunk) // self.world) - self.offset

    def _setup(self) -> dict[str, Any]:
        return {
            "dataset_size": self.dataset_size,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "chunk": self.chunk, "offset": self.offset, **self._setup()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(state.get("version"), "ChunkedSampler.load_state_dict")
        saved = {k: state.get(k) for k in self._setup()}
        if saved != self._setup():
            raise PrepError(
                f"the sampler state was saved with {saved}, this sampler has {self._setup()}",
                "ChunkedSampler.load_state_dict",
                "resume with the same dataset size, chunk size and seed",
            )
        self.chunk, self.offset = int(state["chunk"]), int(state["offset"])


class _ChunkBatches(tud.Sampler[list[int]]):
    """This rank's index lists for the loader's current chunk, from its cursor (fast-forward: skipped
    batches are never formed, let alone loaded)."""

    def __init__(self, loader: ChunkedDataLoader) -> None:
        # a weak reference: a loader <-> sampler cycle would leave persistent workers to the cyclic GC,
        # whose shutdown of them stalls for seconds
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> ChunkedDataLoader:
        ld = self._loader()
        if ld is None:
            raise PrepError(
                "the ChunkedDataLoader of this sampler is gone",
                "ChunkedDataLoader",
                "keep the loader alive while iterating",
            )
        return ld

    def __iter__(self) -> Iterator[list[int]]:
        ld = self.loader
        idx = ld.sampler.chunk_indices(ld.chunk)
        g = ld.global_batch_size
        for b in range(ld.batch_in_chunk, ld.chunk_batches(ld.chunk)):
            batch = idx[b * g : (b + 1) * g]
            yield batch[rank_slice(len(batch), ld.rank, ld.world)].tolist()

    def __len__(self) -> int:
        return self.loader.remaining


# ------------------------------------------------------------------------------------- the loader
class ChunkedDataLoader:
    """`ChunkedDataLoader(dataset, batch_size, chunk_size=None, limit_batches=None, ...)`.

    With `chunk_size` (batches) each `iter()` yields the next chunk and `len()` is that chunk's batch
    count; `chunk_size` takes precedence over `limit_batches`. Without it, each `iter()` is one epoch
    (reshuffled per epoch), cut to `limit_batches` (Lightning's int-or-fraction convention).

    `dataset` is either a map-style torch dataset (then `batch_size` is per rank, and shuffle, seed,
    drop_last and collate_fn apply here) or a prep dataset tree (whose leaves set batch sizes and order).
    `state_dict()` is exact for the batches handed out; `batches_consumed` counts every batch since
    the start of training, including the ones a resume skipped.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = None,
        chunk_size: int | None = None,
        limit_batches: Limit = None,
        *,
        shuffle: bool = True,
        seed: int = 42,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        self.dataset = dataset
        self.chunk_size = _check_size(chunk_size, "chunk_size")
        self.limit_batches = None if self.chunk_size else limit_batches
        self.rank, self.world = dist_info(rank, world_size)
        self.chunk = 0  # the chunk index, or the epoch when not chunked
        self.batch_in_chunk = 0
        self._hold = False  # set_chunk asked for the current chunk after its last batch (its empty rest)
        self.batches_consumed = 0
        self.is_tree = isinstance(dataset, Node)
        limit_to_batches(self.limit_batches, 1)  # refuse a malformed limit now, not at the first epoch
        if self.is_tree:
            if batch_size is not None or collate_fn is not None or not shuffle or drop_last or seed != 42:
                raise PrepError(
                    "batch_size, shuffle, seed, drop_last and collate_fn apply to map-style datasets only",
                    "ChunkedDataLoader",
                    "set batch size, order and collation on the prep dataset itself",
                )
            endless = dataset.batches_per_epoch() is None
            if endless and not self.chunk_size and not isinstance(limit_batches, int):
                raise PrepError(
                    f"{type(dataset).__name__} has no fixed number of batches per epoch: an epoch never ends",
                    "ChunkedDataLoader",
                    "pass chunk_size or an integer limit_batches, or wrap it in EpochizeDataset(ds, length)",
                )
            self._loader = DataLoader(
                dataset,
                num_workers=num_workers,
                pin_memory=pin_memory,
                rank=self.rank,
                world_size=self.world,
                **loader_kwargs,
            )
            return
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise PrepError(
                f"{type(dataset).__name__} has no len() and indexing",
                "ChunkedDataLoader",
                "pass a map-style dataset or a prep dataset tree",
            )
        if _check_size(batch_size, "batch_size") is None:
            raise PrepError(
                "batch_size is required for a map-style dataset",
                "ChunkedDataLoader",
                "pass batch_size (per rank)",
            )
        self.size = len(dataset)
        if self.size < 1:
            raise PrepError("the dataset is empty", "ChunkedDataLoader", "pass a dataset with samples")
        self.batch_size = batch_size
        self.global_batch_size = batch_size * self.world  # type: ignore[operator]
        self.drop_last = drop_last
        tail = self.size % self.global_batch_size
        if not drop_last and 0 < tail < self.world:
            raise PrepError(
                f"the last global batch has {tail} samples for {self.world} ranks, so a rank would get none",
                "ChunkedDataLoader",
                "pass drop_last=True, or a batch/world size that leaves every rank a sample",
            )
        per_chunk = self.chunk_size * self.global_batch_size if self.chunk_size else self.size
        self.sampler = ChunkedSampler(self.size, per_chunk, seed=seed, shuffle=shuffle, rank=0, world_size=1)
        self._torch = tud.DataLoader(
            dataset,
            batch_sampler=_ChunkBatches(self),
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            **{"generator": private_generator(), **loader_kwargs},
        )

    def stats(self) -> dict[str, Any]:
        """Bad samples skipped so far (see `DataLoader.stats`); a map-style dataset skips nothing here."""
        if self.is_tree:
            return self._loader.stats()
        return {"skipped": 0, "by_reason": {}, "by_key": {},
                "retries": {"count": 0, "by_reason": {}, "last": ""}}

    # ------------------------------------------------------------------------------------ sizes
    @property
    def chunks_per_pass(self) -> int | None:
        """Chunks until every sample was seen once (None for trees whose epoch length is unknown)."""
        if not self.chunk_size:
            return 1
        if self.is_tree:
            n = self.dataset.batches_per_epoch()
            return None if n is None else -(-n // self.chunk_size)
        return self.sampler.chunks_per_pass

    def chunk_batches(self, k: int) -> int:
        """Batches chunk (or epoch) k has, after drop_last and limit_batches."""
        if self.is_tree:
            if self.chunk_size:
                return self.chunk_size
            n = self.dataset.batches_per_epoch()
            if n is None:  # endless: an integer limit is the epoch (refused without one at construction)
                return int(self.limit_batches)  # type: ignore[arg-type]
            return limit_to_batches(self.limit_batches, n)
        n = self.sampler.chunk_length(k)
        full = n // self.global_batch_size if self.drop_last else -(-n // self.global_batch_size)
        return limit_to_batches(self.limit_batches, full)

    def __len__(self) -> int:
        return self.chunk_batches(self.chunk)

    @property
    def remaining(self) -> int:
        return max(0, self.chunk_batches(self.chunk) - self.batch_in_chunk)

    # -------------------------------------------------------------------------------- iteration
    def set_chunk(self, chunk: int) -> None:
        """Jump to chunk (or epoch) `chunk`; the current one keeps its position (a finished one: the next
        iter() is its empty rest, not the next chunk, so a resumed trainer's `set_epoch(k)` still means
        chunk k). Moving on from a finished chunk to the next is no jump."""
        if chunk == self.chunk:
            self._hold = self.batch_in_chunk > 0 and self.remaining == 0
            return
        if chunk < 0:
            raise PrepError(f"chunk {chunk} is negative", "ChunkedDataLoader.set_chunk", "pass an index >= 0")
        if chunk == self.chunk + 1 and self.remaining == 0:
            self._advance()
            return
        if self.is_tree:
            if self.chunk_size:
                raise PrepError(
                    f"cannot jump from chunk {self.chunk} to {chunk} of a batch stream",
                    "ChunkedDataLoader.set_chunk",
                    "restore a saved state_dict to resume elsewhere",
                )
            self._loader.set_epoch(chunk)
        self.chunk, self.batch_in_chunk = chunk, 0

    def set_epoch(self, epoch: int) -> None:
        """A chunked trainer's epoch is one chunk, so this selects chunk `epoch` (a no-op when current)."""
        self.set_chunk(epoch)

    def _advance(self) -> None:
        self.chunk, self.batch_in_chunk, self._hold = self.chunk + 1, 0, False
        if self.is_tree and not self.chunk_size:
            self._loader.set_epoch(self.chunk)  # a limited epoch ends early: the next starts afresh

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current chunk, then the cursor moves to the next; a chunk that was finished
        without its loop running out (a break after its last batch, a restore there) is left for the
        next one first, unless `set_chunk` asked for it. Nothing is drawn from the source once the
        chunk is full (a tree's loader counts what it hands out as consumed)."""
        if self.batch_in_chunk and self.remaining == 0 and not self._hold:
            self._advance()
        if self.remaining:
            source = self._tree_batches() if self.is_tree else iter(self._torch)
            try:
                for batch in source:
                    self.batch_in_chunk += 1
                    self.batches_consumed += 1
                    yield batch
                    if self.remaining == 0:
                        break
            finally:
                if hasattr(source, "close"):
                    source.close()
        if self.remaining == 0:
            self._advance()

    def _tree_batches(self) -> Iterator[Any]:
        """The tree's stream from its cursor, across epoch ends, one epoch at a time."""
        empty_epochs = 0
        while True:
            it = iter(self._loader)
            got = False
            try:
                for batch in it:
                    got = True
                    yield batch
            finally:
                it.close()
            if not self.chunk_size:
                return
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs > 1:
                raise PrepError(
                    "the dataset yields no batches",
                    "ChunkedDataLoader",
                    "check the dataset (empty, or drop_last with fewer samples than a batch)",
                )

    # ------------------------------------------------------------------------------------ state
    def _setup(self) -> dict[str, Any]:
        if self.is_tree:
            return {"mode": "tree", "chunk_size": self.chunk_size, "limit_batches": self.limit_batches}
        return {
            "mode": "map",
            "chunk_size": self.chunk_size,
            "limit_batches": self.limit_batches,
            "size": self.size,
            "global_batch_size": self.global_batch_size,
            "drop_last": self.drop_last,
            **self.sampler._setup(),
        }

    def state_dict(self) -> dict[str, Any]:
        out = {
            "version": STATE_VERSION,
            "setup": self._setup(),
            "chunk": self.chunk,
            "batch_in_chunk": self.batch_in_chunk,
            "batches_consumed": self.batches_consumed,
        }
        if self.is_tree:
            out["loader"] = self._loader.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(state.get("version"), "ChunkedDataLoader.load_state_dict")
        if state.get("setup") != self._setup():
            changed = sorted(
                k
                for k in set(self._setup()) | set(state.get("setup", {}))
                if self._setup().get(k) != state.get("setup", {}).get(k)
            )
            raise PrepError(
                f"the saved state belongs to another setup (changed: {', '.join(changed)})",
                "ChunkedDataLoader.load_state_dict",
                "resume with the same dataset size, batch size, chunk size, limit and seed",
            )
        if self.is_tree:
            self._loader.load_state_dict(state["loader"])
        self.chunk, self.batch_in_chunk = int(state["chunk"]), int(state["batch_in_chunk"])
        self.batches_consumed, self._hold = int(state["batches_consumed"]), False
