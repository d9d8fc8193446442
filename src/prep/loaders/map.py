"""`MapDataset` and `Combinator`, the base every prep combinator shares.

A combinator plans in the main process by asking its children, and loads in workers by handing a
child's `BatchDesc` to the node that planned it. Two kinds of descriptors flow up the tree:
- *pass-through*: concat and epochize return their child's descriptor unchanged, so the DataLoader
  calls the leaf's `fetch` directly and a wrapper above can still load it sample by sample;
- *wrapped*: blend, mix and map return `BatchDesc(self.path, ...)` holding the child's descriptor,
  because they change the loaded batch (source tags, weights, `fn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch.utils.data import default_collate

from prep.errors import PrepError
from prep.loaders.base import BatchDesc, Node, rank_slice


def check_node(obj: Any, where: str) -> Node:
    if not isinstance(obj, Node):
        raise PrepError(
            f"{type(obj).__name__} is not a prep dataset",
            where,
            "pass ShardDataset, LocalDataset, SequenceDataset or a combinator of them",
        )
    return obj


def _walk(node: Node) -> Iterable[Node]:
    yield node
    for c in node.children():
        yield from _walk(c)


def is_wrapped(desc: BatchDesc) -> bool:
    """True for a descriptor whose items are child descriptors (blend, map), not sample references."""
    return any(isinstance(x, BatchDesc) for x in desc.items[:2])


class Combinator(Node):
    """A node over child nodes: subtree lookup for fetch, and the shared set_epoch rule.

    `set_epoch(e)` with the node's current epoch is a no-op, so the usual
    `for e in range(start, n): loader.set_epoch(e)` loop keeps a restored mid-epoch cursor.
    """

    def __init__(self, children: Sequence[Node], where: str) -> None:
        self._children = [check_node(c, where) for c in children]
        if not self._children:
            raise PrepError("no datasets given", where, "pass at least one dataset")
        seen: set[int] = set()
        for node in (n for c in self._children for n in _walk(c)):
            if id(node) in seen:
                raise PrepError(
                    f"the same {type(node).__name__} object appears twice in the tree",
                    where,
                    "create one dataset object per position (each keeps its own cursor)",
                )
            seen.add(id(node))
        self.epoch = 0
        self._lookup: dict[str, Node] | None = None

    def children(self) -> Sequence[Node]:
        return self._children

    def bind(self, path: str = "") -> None:
        super().bind(path)
        self._lookup = None

    def node_at(self, path: str) -> Node:
        if self._lookup is None or path not in self._lookup:
            self._lookup = self.nodes()
        try:
            return self._lookup[path]
        except KeyError:
            raise PrepError(
                f"no node at tree path {path!r}",
                self.path or "loader",
                "load batches with the loader tree that planned them",
            ) from None

    def fetch_desc(self, desc: BatchDesc, rank: int, world: int) -> Any:
        return self.node_at(desc.node).fetch(desc, rank, world)

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        """Load a descriptor planned below this node (pass-through descriptors)."""
        return self.fetch_desc(desc, rank, world)

    def reset_cursor(self) -> None:
        """Move this node's own cursor to the start of `self.epoch` (children are reset separately)."""

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.reset_cursor()
        for c in self._children:
            c.set_epoch(epoch)

    def child_states(self) -> list[dict[str, Any]]:
        return [c.state_dict() for c in self._children]

    def load_child_states(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != len(self._children):
            raise PrepError(
                f"the state has {len(states)} children, this {type(self).__name__} has {len(self._children)}",
                self.path or "load_state_dict",
                "resume with the same dataset tree",
            )
        for c, s in zip(self._children, states, strict=True):
            c.load_state_dict(s)

    def child_fingerprints(self) -> list[dict[str, Any]]:
        return [c.fingerprint() for c in self._children]


def load_samples(node: Node, desc: BatchDesc, rank: int, world: int) -> list[dict[str, Any]]:
    """Rank's slice of a sample-level descriptor, loaded as uncollated samples by the node that planned it."""
    if is_wrapped(desc):
        raise PrepError(
            f"a batch planned by {type(node).__name__} cannot be loaded sample by sample",
            node.path or "loader",
            "apply per-sample work below blends and batch-level maps (on each source)",
        )
    loaded = node.fetch_samples(desc.items[rank_slice(len(desc.items), rank, world)])
    return [s for s in loaded if s is not None]  # None: a bad sample, skipped


class MapDataset(Combinator):
    """Apply `fn` to each batch the child loads (energon's `MapDataset` after batching), or with
    `per_sample=True` to each sample before collation, which also works under `MixBatchDataset`.

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
        self.collate_fn = collate_fn or default_collate

    @property
    def child(self) -> Node:
        return self._children[0]

    def next_batch(self) -> BatchDesc:
        d = self.child.next_batch()
        return BatchDesc(self.path, (d,), d.info)

    def next_samples(self, n: int) -> list[Any]:
        return self.child.next_samples(n)

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
        (d,) = desc.items
        if not self.per_sample:
            return self.fn(self.fetch_desc(d, rank, world))
        return self.collate_fn([self.fn(s) for s in load_samples(self.node_at(d.node), d, rank, world)])

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any]]:
        if not self.per_sample:
            raise PrepError(
                "a batch-level MapDataset cannot be mixed inside a batch",
                self.path or "loader",
                "pass per_sample=True so fn sees one sample at a time",
            )
        return [None if s is None else self.fn(s) for s in self.child.fetch_samples(refs)]
