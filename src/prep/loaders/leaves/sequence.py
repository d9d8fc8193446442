"""`SequenceDataset`: an in-memory leaf for small sets (validation captions, probes, tests).

It implements the whole leaf protocol of `prep.loaders.base` — the same cursor, epoch, drop-last and
global-batch rules as the shard leaves — so it can sit anywhere in a blend, mix or concat and resume
exactly. The order of epoch e is a seeded permutation drawn from (seed, tree path, e), so it is the same
whatever the worker count, and two copies of one list at different tree positions are shuffled apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from prep.errors import PrepError
from prep.loaders.base import (
    BatchDesc,
    Node,
    Span,
    check_batch_size,
    check_world,
    counter_rng,
    dist_info,
    slice_refs,
    take_positions,
)
from prep.loaders.io.collate import default_collate_or_empty

Sample = dict[str, Any]


def _as_sample(item: Any, index: int) -> Sample:
    """A dict with a `__key__`: mappings are copied, anything else becomes {"__key__", "value"}."""
    if isinstance(item, Mapping):
        out = dict(item)
        out.setdefault("__key__", f"{index:08d}")
        return out
    return {"__key__": f"{index:08d}", "value": item}


class SequenceDataset(Node):
    """A list of samples as a prep leaf.

    `batch_size` is per rank; a planned batch holds `batch_size * world_size` samples and each rank
    loads its contiguous slice. `drop_last=True` drops the final short global batch of every epoch
    (`dropped_per_epoch` says how many samples that is); `drop_last=False` emits it, split evenly.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        transform: Callable[[Sample], Sample] | None = None,
        collate_fn: Callable[[list[Sample]], Any] | None = None,
        world_size: int | None = None,
    ) -> None:
        check_batch_size(batch_size, "SequenceDataset")
        self.samples = [_as_sample(s, i) for i, s in enumerate(samples)]
        if not self.samples:
            raise PrepError("the sample list is empty", "SequenceDataset", "pass at least one sample")
        self.batch_size = batch_size
        self.world = dist_info()[1] if world_size is None else world_size
        if self.world < 1:
            raise PrepError(
                f"world_size {world_size} must be at least 1",
                "SequenceDataset",
                "pass the number of ranks, or leave it unset to read it from torch.distributed",
            )
        self.global_batch_size = batch_size * self.world
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.transform = transform
        self.collate_fn = collate_fn or default_collate_or_empty
        self.epoch = 0
        self.pos = 0
        self._order: tuple[tuple[str, int], np.ndarray] | None = None
        joined = "\x00".join(str(s["__key__"]) for s in self.samples)  # once: the list is fixed
        self._keys_hash = hashlib.sha256(joined.encode()).hexdigest()[:16]

    # ----------------------------------------------------------------------------------- order
    @property
    def usable(self) -> int:
        """Samples planned per epoch (all of them unless drop_last cuts the final short batch)."""
        n = len(self.samples)
        return n - n % self.global_batch_size if self.drop_last else n

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.samples) - self.usable

    def _epoch_order(self, epoch: int | None = None) -> np.ndarray:
        tag = (self.path, self.epoch if epoch is None else epoch)
        if self._order is None or self._order[0] != tag:
            n = len(self.samples)
            order = (
                counter_rng(self.seed, self.path, "order", tag[1]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (tag, order)
        return self._order[1]

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.pos = 0

    # -------------------------------------------------------------------------------- planning
    def next_batch(self) -> BatchDesc:
        if self.pos >= self.usable:
            self._end_epoch()
            raise StopIteration
        start = self.pos
        self.pos = min(self.usable, start + self.global_batch_size)
        return BatchDesc(self.path, Span(self.epoch, start, self.pos, leaf=self), {"epoch": self.epoch})

    def span_refs(self, span: Span, lo: int, hi: int) -> list[int]:
        return self._epoch_order(span.epoch)[span.start + lo : span.start + hi].tolist()

    def take(self, n: int) -> tuple[Span, bool]:
        return take_positions(self, len(self.samples), n)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the same epoch keeps a restored mid-epoch cursor
            self.epoch, self.pos = epoch, 0

    def batches_per_epoch(self) -> int:
        return -(-self.usable // self.global_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "sequence",
            "samples": len(self.samples),
            "keys": self._keys_hash,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    # --------------------------------------------------------------------------------- loading
    def _load(self, refs: Sequence[int]) -> list[Sample]:
        out = [dict(self.samples[i]) for i in refs]
        return [self.transform(s) for s in out] if self.transform else out

    def fetch_samples(self, refs: Sequence[int]) -> list[Sample | None]:
        return list(self._load(refs))  # no None: samples held in memory are never bad

    def collate_loaded(self, samples: list[Any]) -> Any:
        return self.collate_fn(samples)

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        check_world(self, self.world, world)
        return self.collate_loaded(self._load(slice_refs(self, desc.items, rank, world)))
