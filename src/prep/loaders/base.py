"""The loader tree's protocol: plan batches in the main process, load them in workers.

Every dataset (leaf or combinator) is a `Node`. Planning (`next_batch`, `take`) is cheap, pure
given the node's cursor, and runs in the main process; it produces a `BatchDesc` that names samples,
not bytes. Loading (`fetch`, `fetch_samples`) does the I/O and runs in DataLoader workers. Because the
order never depends on workers, the state is just the cursors of the tree after the last batch the
trainer received: restoring it is O(1), exact, and independent of the worker count.

Batches are *global*: a node plans `global_batch_size` samples per batch (per-rank batch size x world
size), and `fetch(desc, rank, world)` loads only that rank's slice. The global stream never depends on
the world size, so a run saved on W ranks resumes on W' ranks (same global batch) exactly. Planned
items are `Planned` descriptions, not lists of references — a leaf's a `Span` (a range of its epoch
positions), a concat's take `Pieces` of its parts' spans, a mix's its per-source counts and takes —
so planning a step costs the same at 1 rank or 4,096, and each worker computes the references of its
rank's slice only (`span_refs`).

The two kinds of node share their machinery here: `SampleLeaf` (a leaf whose epoch is a sequence of
positions: shard, local and sequence datasets) and `Combinator` (a node over child nodes). A combinator
plans by asking its children and loads by handing a child's `BatchDesc` to the node that planned it.
Two kinds of descriptors flow up the tree:
- *pass-through*: concat and epochize return their child's descriptor unchanged, so the DataLoader
  calls the leaf's `fetch` directly and a wrapper above can still load it sample by sample;
- *wrapped*: blend and map return `BatchDesc(self.path, ...)` holding the child's descriptor, and mix
  one holding its children's takes, because they change the loaded batch (source tags, weights, `fn`).
Also here: the random streams (`counter_rng`), the state version and fingerprint diffs, and `Source`
(a weighted child of a blend or mix).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prep.errors import PrepError
from prep.loaders import skips
from prep.loaders.io.collate import collate_samples, default_collate_or_empty

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
    node's picklable sample references in global order — `Planned` (a range, or a mix's counts and
    ranges, whatever the world size) for a leaf's or a mix's batch; `info` is small metadata carried to
    the batch."""

    node: str
    items: Sequence[Any]
    info: dict[str, Any] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its constructor call: a slots dataclass otherwise pickles through `fields()` and
        unpickles by a `setattr` per field, in Python, for every batch a worker is sent."""
        return (BatchDesc, (self.node, self.items, self.info))


class Planned(Sequence[Any]):
    """Planned sample references held as a compact description (a range, pieces of ranges, a mix's
    counts), whatever the world size; the node that planned it computes any part of it with
    `span_refs(items, lo, hi)` — a worker, only its rank's slice. In the planning process it also reads
    as the sequence of references (tests and tools iterate it); subclasses pickle without the node, so
    a descriptor sent to a worker never carries the tree."""

    __slots__ = ("_node",)

    def __init__(self, node: Node | None) -> None:
        self._node = node

    def __getitem__(self, index: Any) -> Any:
        if self._node is None:
            raise PrepError(f"a {type(self).__name__} sent to another process holds no node to read "
                            "references from", type(self).__name__,
                            "resolve it with span_refs on the node that planned it")
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            refs = self._node.span_refs(self, lo, max(lo, hi))
            return refs[::step] if step != 1 else refs
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(index)
        return self._node.span_refs(self, i, i + 1)[0]

    def __iter__(self) -> Iterator[Any]:
        return iter(self[:])


class Span(Planned):
    """A leaf's planned batch as a range: positions [start, stop) of its `epoch` (or, with `batch` >= 0,
    items [start, stop) of that planned batch of a bucketed leaf). Planning stays O(1) in the world
    size: a worker computes only its rank's references (`SampleLeaf.span_refs`). It pickles as the bare
    range."""

    __slots__ = ("batch", "epoch", "start", "stop")

    def __init__(self, epoch: int, start: int, stop: int, batch: int = -1,
                 leaf: Node | None = None) -> None:
        super().__init__(leaf)
        self.epoch, self.start, self.stop, self.batch = epoch, start, stop, batch

    def __len__(self) -> int:
        return self.stop - self.start

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Span) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple[int, int, int, int]:
        return (self.epoch, self.start, self.stop, self.batch)

    def __repr__(self) -> str:
        return f"Span(epoch={self.epoch}, start={self.start}, stop={self.stop}, batch={self.batch})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Span, self.key())


class Pieces(Planned):
    """Takes of several children one after another, each tagged with its child's index (a concat's
    take that crosses part boundaries): `parts` is ((index, child's take), ...)."""

    __slots__ = ("lengths", "parts")

    def __init__(self, parts: Sequence[tuple[int, Sequence[Any]]], node: Node | None = None) -> None:
        super().__init__(node)
        self.parts = tuple(parts)
        self.lengths = tuple(len(p) for _, p in self.parts)

    def __len__(self) -> int:
        return sum(self.lengths)

    def __repr__(self) -> str:
        return f"Pieces({list(self.parts)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Pieces, (self.parts,))


def pieces_at(lengths: Sequence[int], lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """(piece, a, b) for each piece of the given lengths that items [lo, hi) of their concatenation
    overlap, with [a, b) the overlap inside that piece: a range over pieces resolved piece by piece."""
    start = 0
    for k, n in enumerate(lengths):
        a, b = max(lo - start, 0), min(hi - start, n)
        if a < b:
            yield k, a, b
        start += n
        if start >= hi:
            return


def check_world(node: Node, planned: int, world: int) -> None:
    """Refuse to load a batch planned for another world size: each rank would get another share of it than
    its batch_size asks (the node's batch_size x `planned` samples split over `world` ranks)."""
    if world != planned:
        raise PrepError(
            f"the dataset planned for a world of {planned} ranks, the loader runs {world}",
            node.path or type(node).__name__,
            "pass the same rank/world_size to both, or neither",
        )


def rank_slice(n: int, rank: int, world: int) -> slice:
    """Rank r's contiguous part of a global batch of n items (even split; the first n % world ranks get
    one more when n is not divisible, as happens only for a final short batch with drop_last=False)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def take_positions(leaf: Any, total: int, n: int) -> tuple[Span, bool]:
    """A leaf's `take`: the next n of its `total` epoch positions from its cursor (`epoch`, `pos`) as a
    span; when fewer are left, those, and the leaf moves to the start of its next epoch."""
    span = Span(leaf.epoch, leaf.pos, min(total, leaf.pos + n), leaf=leaf)
    leaf.pos = span.stop
    if len(span) < n:
        leaf.set_epoch(leaf.epoch + 1)
        return span, True
    return span, False


def slice_refs(node: Node, items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Rank's part of a planned batch's references: computed by the node that planned it for `Planned`
    items (only this slice, whatever the world size), sliced from the list otherwise."""
    part = rank_slice(len(items), rank, world)
    if isinstance(items, Planned):
        return node.span_refs(items, part.start, part.stop)
    return list(items[part])


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

    def take(self, n: int) -> tuple[Sequence[Any], bool]:
        """Plan up to n sample references (for mixing inside a batch) as a `Planned` description, and
        whether the epoch ended on the way: fewer than n come back only when it did (the cursor is then
        at the start of the next epoch), so mixing and concatenating lose no sample at an epoch end."""
        raise PrepError(f"{type(self).__name__} cannot be mixed inside a batch", self.path or "loader",
                        "mix shard or local datasets (or concats of them)")

    def next_samples(self, n: int) -> Sequence[Any]:
        """The next n sample references (`take(n)`); StopIteration when the epoch had fewer than n left
        (they are unused this epoch, and the cursor is at the start of the next)."""
        refs, _ = self.take(n)
        if len(refs) < n:
            raise StopIteration
        return refs

    def set_epoch(self, epoch: int) -> None:
        for c in self.children():
            c.set_epoch(epoch)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This node's cursor plus its children's, as JSON-able data in fresh containers (the loader keeps
        each batch's state as a snapshot without copying it, so none may be shared with the node)."""

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

    def span_refs(self, span: Any, lo: int, hi: int) -> list[Any]:
        """References of items [lo, hi) of `Planned` items this node planned (a `Span` for a leaf; a
        rank's slice, in its worker)."""
        raise PrepError(f"{type(self).__name__} plans no spans", self.path or "loader",
                        "load batches with the loader tree that planned them")

    def fetch_samples(self, refs: Sequence[Any]) -> list[dict[str, Any] | None]:
        """Load samples (decoded and transformed, not collated) for the given references: one entry per
        reference, None where a bad sample was skipped (whoever collates drops those)."""
        raise PrepError(f"{type(self).__name__} cannot be mixed inside a batch", self.path or "loader",
                        "mix shard or local datasets")

    def collate_loaded(self, samples: list[Any]) -> Any:
        """Samples this node loaded (`fetch_samples`), made into the batch its `fetch` would give: what a
        per-sample map above it batches its mapped samples with, so the map changes the samples, not the
        batch's layout. Here torch's `default_collate`; nodes with their own collation override it."""
        return default_collate_or_empty(samples)


def fingerprint_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_fingerprints(old: Any, new: Any, path: str = "") -> list[str]:
    """Human lines saying what changed between two fingerprints (for the mismatch error): the dotted path
    of each changed value at any depth (`children.1.seed: 1 -> 2`) and both values, whole (`(absent)` for
    a key only one side has, e.g. a marker an older prep did not write)."""
    where = path or "value"
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{p}: (absent) -> {json.dumps(new[k], default=str)}")
            elif k not in new:
                out.append(f"{p}: {json.dumps(old[k], default=str)} -> (absent)")
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


def batches_per_epoch(total: int, global_batch: int, drop_last: bool) -> int:
    """Whole global batches per epoch, plus one short one when the tail is kept."""
    full, tail = divmod(total, global_batch)
    return full + (1 if tail and not drop_last else 0)


def known_sizes(sizes: Sequence[int | None]) -> list[int] | None:
    """Every child's batches per epoch, or None when any is unknown (endless): then so is the parent's."""
    known = [s for s in sizes if s is not None]
    return known if len(known) == len(sizes) else None


def sum_of_sizes(sizes: Sequence[int | None]) -> int | None:
    """The sum of the children's sizes per epoch (batches of a node that plays them one after another,
    samples of a concat); None when any is unknown or endless."""
    known = known_sizes(sizes)
    return None if known is None else sum(known)


DEFAULT_MAX_SKIP_FRACTION = 0.05  # more bad samples than this is a damaged dataset, not bad luck


Transform = Callable[[dict[str, Any]], dict[str, Any]]


Collate = Callable[[list[dict[str, Any]]], Any]


def check_batch_size(batch_size: Any, where: str) -> int:
    """A per-rank batch size: a positive int (a float or a string would fail later, far from its cause)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrepError(f"batch_size {batch_size!r} must be a positive integer", where,
                        "pass the per-rank batch size")
    return batch_size


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
    `take(n)` the next n as a span (for mixing). Subclasses define `refs`, `load` and `fingerprint`.
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

    def span_refs(self, span: Span, lo: int, hi: int) -> list[Any]:
        return self.refs(span.epoch, span.start + lo, span.start + hi)

    def _end_epoch(self) -> StopIteration:
        self.epoch, self.pos = self.epoch + 1, 0
        return StopIteration()

    def next_batch(self) -> BatchDesc:
        left = self.total - self.pos
        if left <= 0 or (self.drop_last and left < self.global_batch):
            raise self._end_epoch()
        start, stop = self.pos, min(self.total, self.pos + self.global_batch)
        self.pos = stop
        span = Span(self.epoch, start, stop, leaf=self)
        return BatchDesc(self.path, span, {"epoch": self.epoch, "start": start})

    def take(self, n: int) -> tuple[Span, bool]:
        return take_positions(self, self.total, n)

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
    collate: Collate | None = None  # the user's collation, replacing `collate_samples`

    def collate_loaded(self, samples: list[Any]) -> Any:
        return (self.collate or collate_samples)(samples)

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        check_world(self, self.world, world)
        with skips.leaf(self.path):
            return self.load_batch(slice_refs(self, desc.items, rank, world))

    @abstractmethod
    def load_batch(self, refs: Sequence[Any]) -> Any:
        """Load, decode and collate these references (runs in a worker)."""


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
    return not isinstance(desc.items, Planned) and any(isinstance(x, BatchDesc) for x in desc.items[:2])


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
    loaded = node.fetch_samples(slice_refs(node, desc.items, rank, world))
    return [s for s in loaded if s is not None]  # None: a bad sample, skipped


@dataclass(frozen=True)
class Source:
    """A dataset with its blend/mix weight. `name` tags its samples in `__source__` (default: its
    position); `sample_weight` is the loss weight its samples carry in `__weight__` (as energon users
    do with subflavors) — it changes no order, so a resumed run may change it."""

    dataset: Node
    weight: float
    name: str | None = None
    sample_weight: float | None = None


def weights_samples(sources: Sequence[Source]) -> bool:
    """Whether a blend or mix gives its samples `__weight__`: when any source, or any blend or mix below
    one, has a sample_weight. Every batch then carries the key (1.0 where none applies), whichever branch
    of the tree it came from, so batches keep one layout through nesting."""
    return any(
        s.sample_weight is not None or any(getattr(n, "weighted", False) for n in _walk(s.dataset))
        for s in sources
    )


def _finite_number(x: Any) -> bool:
    """An int or float (not a bool, a string or a container) that is finite."""
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def parse_sources(args: Sequence[Any], where: str) -> list[Source]:
    """`(dataset, weight)` tuples or `Source` objects -> validated `Source`s with names."""
    out: list[Source] = []
    for i, a in enumerate(args):
        if isinstance(a, Source):
            s = a
        elif isinstance(a, tuple) and len(a) == 2:
            s = Source(a[0], a[1])
        else:
            raise PrepError(
                f"argument {i} is {type(a).__name__}, not (dataset, weight)",
                where,
                "pass (dataset, weight) tuples or prep.loaders.Source objects",
            )
        check_node(s.dataset, f"{where} source {i}")
        if not _finite_number(s.weight) or s.weight <= 0:
            raise PrepError(
                f"weight {s.weight!r} of source {i} must be a positive number",
                where,
                "give every source a weight > 0 (weights are normalised)",
            )
        if s.sample_weight is not None and not _finite_number(s.sample_weight):
            raise PrepError(
                f"sample_weight {s.sample_weight!r} of source {i} is not a finite number",
                where,
                "pass a finite loss weight (a float), or None for none",
            )
        out.append(
            Source(s.dataset, float(s.weight), s.name if s.name is not None else str(i), s.sample_weight)
        )
    if not out:
        raise PrepError("no sources given", where, "pass at least one (dataset, weight)")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise PrepError(f"source names {names} repeat", where, "give each source its own name")
    return out
