"""`MapDataset`: a function over each loaded batch, or over each sample before collation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prep.errors import PrepError
from prep.loaders.base import BatchDesc, Collate, Combinator, Node, load_samples


class MapDataset(Combinator):
    """Apply `fn` to each batch the child loads (energon's `MapDataset` after batching), or with
    `per_sample=True` to each sample before collation, which also works under `MixBatchDataset`. The
    mapped samples are collated as the child collates its own (its `collate`, a mix's `batch_mix_fn`),
    unless `collate_fn` is given.

    `fn` runs in the loader workers, so it must be picklable (a module-level function or a
    functools.partial of one). It does not change the order, so it is not part of the fingerprint.
    """

    def __init__(
        self,
        dataset: Node,
        fn: Callable[[Any], Any],
        *,
        per_sample: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__([dataset], "MapDataset")
        if not callable(fn):
            raise PrepError(f"fn {fn!r} is not callable", "MapDataset", "pass a function")
        self.fn = fn
        self.per_sample = per_sample
        self.collate_fn = collate_fn

    @property
    def child(self) -> Node:
        return self._children[0]

    def next_batch(self) -> BatchDesc:
        d = self.child.next_batch()
        return BatchDesc(self.path, (d,), d.info)

    def take(self, n: int) -> tuple[Sequence[Any], bool]:
        return self.child.take(n)

    def span_refs(self, span: Any, lo: int, hi: int) -> list[Any]:
        return self.child.span_refs(span, lo, hi)

    def set_epoch(self, epoch: int) -> None:
        self.child.set_epoch(epoch)  # no cursor of its own

    def batches_per_epoch(self) -> int | None:
        return self.child.batches_per_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"child": self.child.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.child.load_state_dict(state["child"])

    def fingerprint(self) -> dict[str, Any]:
        return {"type": "map", "per_sample": self.per_sample, "child": self.child.fingerprint()}

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        if desc.node != self.path:
            return self.fetch_desc(desc, rank, world)
        if not self.per_sample:
            (d,) = desc.items
            return self.fn(self.fetch_desc(d, rank, world))
        collate, samples = self.mapped_samples(desc, rank, world)
        return collate(samples)

    def mapped_samples(self, desc: BatchDesc, rank: int, world: int) -> tuple[Collate, list[Any]]:
        """Rank's samples of a batch this per-sample map planned, mapped, and how to batch them: its own
        `collate_fn`, else as the node below batches its samples. Per-sample maps below it are loaded
        through (each maps in turn), as they are under a mix."""
        (d,) = desc.items
        node = self.node_at(d.node)
        if isinstance(node, MapDataset) and node.per_sample:
            collate, samples = node.mapped_samples(d, rank, world)
        else:
            collate, samples = node.collate_loaded, load_samples(node, d, rank, world)
        return self.collate_fn or collate, [self.fn(s) for s in samples]

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any] | None]:
        if not self.per_sample:
            raise PrepError(
                "a batch-level MapDataset cannot be mixed inside a batch",
                self.path or "loader",
                "pass per_sample=True so fn sees one sample at a time",
            )
        return [None if s is None else self.fn(s) for s in self.child.fetch_samples(refs)]
