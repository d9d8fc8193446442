"""`DataLoader`: a thin layer over `torch.utils.data.DataLoader` with exact `state_dict()`.

The root node plans batches in the main process through a sampler; workers only fetch. The state of
the tree after each planned batch is queued in the main process and taken when that batch is handed
to the trainer, so `state_dict()` describes exactly the batches consumed: no worker snapshots, no
replay, and the same state whatever `num_workers` is.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import weakref
from collections import deque
from collections.abc import Generator, Iterator
from typing import Any

import torch
import torch.utils.data as tud

from prep.errors import PrepError
from prep.loaders import skips
from prep.loaders.base import (
    STATE_VERSION,
    BatchDesc,
    Node,
    check_state_version,
    diff_fingerprints,
    dist_info,
    fingerprint_hash,
)
from prep.loaders.io import retry, torch_private
from prep.loaders.io.queues import caller_writes_context
from prep.loaders.io.retry import Retried
from prep.loaders.io.shm import slot_scope
from prep.loaders.skips import Skip, SkipStats


class _PlanSampler(tud.Sampler):
    """Yields the root's planned batches; records the tree's cursor after each one."""

    def __init__(self, loader: DataLoader) -> None:
        # weak: a loader <-> sampler cycle leaves persistent workers to the cyclic GC, which stalls ~10 s
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> DataLoader:
        return self._loader()  # type: ignore[return-value]  # the loader owns this sampler

    def __iter__(self) -> Iterator[tuple[BatchDesc, ...]]:
        """Groups of up to `batches_per_fetch` consecutive batches: one worker round trip carries them
        all, which divides torch's per-request overhead in the main process. Each worker's first
        request of an iteration carries one batch, so the first batches arrive as soon as one batch is
        loaded (fresh start and resume alike)."""
        loader = self.loader
        root = loader.dataset
        group: list[BatchDesc] = []
        singles = loader.num_workers  # requests left that carry one batch
        while True:
            try:
                desc = root.next_batch()
            except StopIteration:
                loader._epoch_end_state = loader._left = root.state_dict()
                if group:
                    yield tuple(group)
                return
            # state_dict() builds fresh containers, so the snapshot needs no copy: its cost is the tree's
            # size (a few small dicts), never the world size's
            loader._left = root.state_dict()
            loader._pending.append(loader._left)
            group.append(desc)
            if len(group) == (1 if singles > 0 else loader.batches_per_fetch):
                singles -= 1
                yield tuple(group)
                group = []

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.loader.dataset.batches_per_epoch()
        if n is None:
            raise TypeError("this dataset has no fixed length")
        singles = min(n, self.loader.num_workers)
        return singles + -(-(n - singles) // self.loader.batches_per_fetch)


class WorkerError:
    """A PrepError raised in a worker, sent back as a result: torch would re-raise it as the text of the
    worker's traceback, and the user should read the one line that says what, where and how to fix."""

    __slots__ = ("error",)

    def __init__(self, error: PrepError) -> None:
        self.error = error


class _Fetcher(tud.Dataset):
    """What workers hold: the tree's nodes by path, to call `fetch` on the node that planned a batch."""

    def __init__(self, root: Node, rank: int, world: int) -> None:
        self.nodes = root.nodes()
        self.rank = rank
        self.world = world

    def __getitem__(self, descs: tuple[BatchDesc, ...]
                    ) -> tuple[list[Any], list[Skip], Retried] | WorkerError:
        """The batches, the bad samples skipped while loading them and this process's remote retries since
        the last request (they travel with the batches)."""
        with slot_scope() as sent, skips.collecting() as skipped:
            try:
                out = [self.nodes[d.node].fetch(d, self.rank, self.world) for d in descs]
            except PrepError as err:
                if tud.get_worker_info() is None:
                    raise
                return WorkerError(err)
            sent(out)
        return out, skipped, retry.drain()

    def __len__(self) -> int:  # pragma: no cover - torch asks only for map-style sizing hints
        return 0


def _identity(batch: Any) -> Any:
    return batch


_GC_ENABLED_AT_FORK = True  # whether the training process's cyclic GC was on when its workers forked


def _worker_start(worker_id: int) -> None:
    """A worker starts with the objects it inherited (torch, the dataset tree) moved out of the cyclic
    GC's generations. A forked worker inherits the whole parent heap; without this, every full collection
    walks all of it (~0.1 s each, about one per 6,000 samples here: ~20 us a sample) and writes to each
    object's GC header, which copies the parent's pages into the worker. The GC is off from before the
    fork until here (`_forking_workers`), then back to what the training process had."""
    gc.freeze()
    if _GC_ENABLED_AT_FORK:
        gc.enable()


@contextlib.contextmanager
def _forking_workers() -> Iterator[None]:
    """The cyclic GC off while torch forks the workers: a collection that falls due in a new worker
    before `_worker_start` freezes its heap walks (and copies) all of it. That happened at every start
    whose parent had just built a large state (a big index, a restored loader): 0.12-0.14 s per worker,
    before the first batch."""
    global _GC_ENABLED_AT_FORK
    _GC_ENABLED_AT_FORK = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _GC_ENABLED_AT_FORK:
            gc.enable()


_PIPE_BYTES = 1 << 20


def _grow_result_pipe(batches: Any) -> None:
    """Workers send batches through one pipe; a batch of encoded images is 0.5-1 MiB, which a default
    64 KiB pipe carries in ~10 pieces, each a read (plus a wake-up of the worker) in the main process.
    On Linux, a 1 MiB pipe (the unprivileged maximum) carries it in one. Best effort: elsewhere, a no-op."""
    reader = torch_private.result_pipe_reader(batches)
    if reader is None:
        return
    try:
        import fcntl

        fcntl.fcntl(reader.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError, ValueError):
        pass


def private_generator() -> torch.Generator:
    """torch's DataLoader draws its workers' base seed from this generator at every `iter()`; without one
    it draws from torch's global generator, so a trainer that restores its RNG state after a resume would
    see other numbers. prep's workers use no torch randomness (crops are seeded per sample), so a fixed
    private generator serves."""
    return torch.Generator().manual_seed(0)


class DataLoader:
    """Iterate batches of a prep dataset tree; `state_dict()`/`load_state_dict()` resume exactly.

    One `iter()` is one epoch of the root (or the rest of it, after a restore). Breaking out of the loop
    and iterating again continues from the last batch handed out. `batches_per_fetch` consecutive
    batches travel in one worker request (default 2 with workers: half the per-request overhead; the
    order and the state are the same for every value).
    """

    def __init__(self, dataset: Node, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, timeout: float = 0,
                 multiprocessing_context: Any = None, rank: int | None = None,
                 world_size: int | None = None, batches_per_fetch: int | None = None) -> None:
        if batches_per_fetch is not None and batches_per_fetch < 1:
            raise PrepError(f"batches_per_fetch={batches_per_fetch} must be >= 1", "DataLoader",
                            "pass 1 or more (or leave it unset)")
        self.batches_per_fetch = batches_per_fetch or (2 if num_workers > 0 else 1)
        self.dataset = dataset
        dataset.bind("")
        self.rank, self.world = dist_info(rank, world_size)
        self.num_workers = num_workers
        self._mp_context = multiprocessing_context
        self._pending: deque[dict[str, Any]] = deque()
        self._state: dict[str, Any] | None = None
        self._epoch_end_state: dict[str, Any] | None = None
        self._consumed = 0
        self._left: dict[str, Any] | None = None  # the tree's cursor as the loader last left it
        self._skips = SkipStats()
        self._retries = retry.RetryStats()
        leaves = [n for n in dataset.nodes().values() if hasattr(n, "max_skip_fraction")]
        self._skip_limits = {n.path: (n.total, n.max_skip_fraction) for n in leaves}  # type: ignore[attr-defined]
        at_open = [dataclasses.replace(s, leaf=n.path) for n in leaves
                   for s in getattr(n, "skipped_at_open", ())]
        self._skips.add(at_open, {})
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor or 2
            kwargs["persistent_workers"] = persistent_workers
            kwargs["multiprocessing_context"] = multiprocessing_context  # torch checks it here
            kwargs["worker_init_fn"] = _worker_start
        self._torch = tud.DataLoader(_Fetcher(dataset, self.rank, self.world), batch_size=None,
                                     sampler=_PlanSampler(self), num_workers=num_workers,
                                     collate_fn=_identity, pin_memory=pin_memory, timeout=timeout,
                                     generator=private_generator(), **kwargs)

    def __iter__(self) -> Generator[Any, None, None]:
        if self._state is not None:
            if self._left is None or self.dataset.state_dict() == self._left:
                # the sampler may have planned ahead of what was consumed: back to what was consumed
                self.dataset.load_state_dict(copy.deepcopy(self._state))
            else:  # the tree was moved since (node.set_epoch, node.load_state_dict): that is where to go on
                self._state = None
        if self._state is None:  # what is consumed starts here: a first batch that fails rolls back to it
            self._state = self.dataset.state_dict()
        self._pending.clear()
        self._epoch_end_state = None
        if self.num_workers:
            # resolved here, not at construction: the default start method stays open until workers start
            self._torch.multiprocessing_context = caller_writes_context(self._mp_context)
        with _forking_workers() if self.num_workers else contextlib.nullcontext():
            batches = iter(self._torch)
        _grow_result_pipe(batches)
        for fetched in batches:
            if isinstance(fetched, WorkerError):
                # raised without this frame holding the error (or the error this frame), so no reference
                # cycle keeps the last batches' shared memory or torch's iterator alive until a GC
                error = fetched.error
                del fetched, batches
                try:
                    raise error
                finally:
                    del error
            group, skipped, retried = fetched
            if skipped:
                self._skips.add(skipped, self._skip_limits)
            self._retries.add(retried)
            for batch in group:
                self._state = self._pending.popleft()
                self._consumed += 1
                yield batch
        if self._epoch_end_state is not None:
            self._state = copy.deepcopy(self._epoch_end_state)

    def __len__(self) -> int:
        n = self.dataset.batches_per_epoch()
        if n is None:
            raise TypeError("this dataset has no fixed number of batches per epoch")
        return n

    @property
    def sampler(self) -> _PlanSampler:
        """The planning sampler; its `set_epoch` is the loader's. Trainers that call
        `dataloader.sampler.set_epoch(epoch)` at every epoch start (Lightning) thereby start each epoch
        where the loader's order says, also after consuming exactly len() batches without exhausting it."""
        return self._torch.sampler  # type: ignore[return-value]

    def set_epoch(self, epoch: int) -> None:
        if self._state is not None:  # workers may have planned ahead: start from what was consumed
            self.dataset.load_state_dict(copy.deepcopy(self._state))
        self.dataset.set_epoch(epoch)
        self._state = self.dataset.state_dict()
        self._left = copy.deepcopy(self._state)

    def stats(self) -> dict[str, Any]:
        """Bad samples skipped so far (on_error="skip"): {"skipped": n, "by_reason": {reason: n},
        "by_key": {"shard sample key": n}} — images that could not be bucketed when a LocalDataset opened
        included. Skipped samples are dropped from their batches, so those batches are shorter. And the
        remote reads tried again (`ShardDataset(retry=...)`): "retries": {"count": n, "by_reason":
        {"HTTP 503": n, ...}, "last": "URL: what failed"}, counted as the workers report them."""
        self._retries.add(retry.drain())  # this process's own (a loader without workers, or its setup)
        return {**self._skips.as_dict(), "retries": self._retries.as_dict()}

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def state_dict(self) -> dict[str, Any]:
        fp = self.dataset.fingerprint()
        return {
            "version": STATE_VERSION,
            "fingerprint": fingerprint_hash(fp),
            "fingerprint_doc": fp,
            "batches_consumed": self._consumed,
            "world_size": self.world,
            "tree": copy.deepcopy(self._state if self._state is not None else self.dataset.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(state.get("version"), "DataLoader.load_state_dict")
        fp = self.dataset.fingerprint()
        if state.get("fingerprint") != fingerprint_hash(fp):
            changes = diff_fingerprints(state.get("fingerprint_doc", {}), fp)
            raise PrepError("the saved loader state belongs to another dataset setup: "
                            + ("; ".join(changes[:5]) or "fingerprint differs"), "load_state_dict",
                            "resume with the same shards, weights, seeds, global batch size and prep "
                            "version, or start fresh")
        self.dataset.load_state_dict(copy.deepcopy(state["tree"]))
        self._state = copy.deepcopy(state["tree"])
        self._left = copy.deepcopy(self._state)
        self._consumed = int(state.get("batches_consumed", 0))
