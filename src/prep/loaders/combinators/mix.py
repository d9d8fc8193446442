"""`MixBatchDataset`: samples of several sources inside one batch.

Per planned global batch the counts per source are either
- `multinomial`: drawn from a counter-based generator keyed by (seed, tree path, epoch, batch), as
  energon does (at 1:2 a batch of 6 can hold 0 to 6 of the first source), or
- `stratified`: exact — every source gets floor(n*w_i) or ceil(n*w_i) (largest remainder), and the
  +1s rotate by earliest deadline so that over g batches source i totals floor or ceil of g*n*w_i
  (a fixed largest-remainder tie-break would drift: 0.6/0.4 at 32 gives 19/13, i.e. 59.4%, forever).

Positions inside the global batch interleave the sources (random for multinomial, evenly spread for
stratified), so every rank's contiguous slice gets its share (stratified: less than 2 samples off).

A planned batch is O(sources) whatever the world size (`MixPlan`): the counts, each source's take as
its child's range description, and the batch number. The interleave is never materialised while
planning: any window of positions (a rank's slice, in its worker) is computed directly, in work
proportional to the window plus sources x log(batch) — the random interleave from a tree of
hypergeometric splits over positions (`shuffled_window`), the even spread in closed form
(`spread_window`). Both depend on positions only, so the global stream is the same at every world size.

Each sample is collated as a batch of one and `batch_mix_fn` receives the rank's list of them, in
batch order — energon's call shape, so
`homogeneous_concat_mix` concatenates (padding tensors with `concat_pad`) and a custom function can
build anything for heterogeneous sources. Samples carry `__source__` and, when a source has a
`sample_weight`, `__weight__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from fractions import Fraction
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import default_collate

from prep.errors import PrepError
from prep.loaders.base import (
    BatchDesc,
    Combinator,
    Node,
    Planned,
    Source,
    check_batch_size,
    check_world,
    counter_rng,
    dist_info,
    parse_sources,
    pieces_at,
    slice_refs,
    weights_samples,
)
from prep.loaders.combinators.blend import exact_weights, loss_weight
from prep.loaders.io.collate import empty_batch

Counts = Literal["multinomial", "stratified"]
_SCALAR = (str, bytes, int, float, bool, type(None))
# In a multinomial mix's fingerprint: its interleave is drawn by windows (`shuffled_window`). States saved
# by the planner before (one permutation of the whole batch) lack it, so they are refused instead of
# resumed into another order. The stratified stream did not change (same spread, same takes), so its
# fingerprint has no marker and its older states resume.
PLANNER = "mix-windows-2"
LEAF_POSITIONS = 256  # the random interleave's tree stops here and shuffles the block in one draw


# ----------------------------------------------------------------------------------- batch_mix_fn
def concat_pad(batch: Sequence[Any]) -> Any:
    """Concatenate tensors (or arrays) along dim 0, zero-padding every other dim to the largest size, in
    the type they promote to (as torch.cat and numpy do: float16 with float32 is float32, ints with
    floats are floats), so no source's values are cast down to another's."""
    first = batch[0]
    if any(b.ndim != first.ndim for b in batch) or first.ndim == 0:
        raise PrepError(
            f"cannot concatenate arrays of ranks {sorted({b.ndim for b in batch})}",
            "concat_pad",
            "give every source the same number of dimensions (batch dim first)",
        )
    total = sum(int(b.shape[0]) for b in batch)
    size = [max(int(b.shape[d]) for b in batch) for d in range(1, first.ndim)]
    if isinstance(first, torch.Tensor):
        dtype = functools.reduce(torch.promote_types, (b.dtype for b in batch))
        out: Any = first.new_zeros((total, *size), dtype=dtype)
    else:
        out = np.zeros((total, *size), dtype=np.result_type(*batch))
    start = 0
    for b in batch:
        n = int(b.shape[0])
        out[(slice(start, start + n), *(slice(0, s) for s in b.shape[1:]))] = b
        start += n
    return out


def generic_concat(batch: Sequence[Any]) -> Any:
    """Concatenate a list of batches field by field: tensors/arrays with `concat_pad`, dicts, dataclasses
    and named tuples by field, lists of strings or numbers end to end, other sequences by position."""
    first = batch[0]
    if isinstance(first, torch.Tensor | np.ndarray):
        return concat_pad(batch)
    if isinstance(first, Mapping):  # by name, in the first one's order (other sources may list another)
        keys = list(first)
        for b in batch[1:]:
            if set(b) != set(keys):
                raise PrepError(
                    f"batches have different fields: {sorted(keys)} vs {sorted(b)}",
                    "homogeneous_concat_mix",
                    "pass a batch_mix_fn that handles heterogeneous sources",
                )
        return {k: generic_concat([b[k] for b in batch]) for k in keys}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(
            **{f.name: generic_concat([getattr(b, f.name) for b in batch]) for f in dataclasses.fields(first)}
        )
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(generic_concat(list(col)) for col in zip(*batch, strict=True)))
    if isinstance(first, list | tuple):
        if all(isinstance(x, _SCALAR) for b in batch for x in b):
            return [x for b in batch for x in b]
        return type(first)(generic_concat(list(col)) for col in zip(*batch, strict=True))
    return list(batch)


def homogeneous_concat_mix(samples: Sequence[Any]) -> Any:
    """Mix batches of one type into one batch by concatenation (energon's helper of the same name); none
    (a rank's samples all skipped as bad) give `empty_batch()`."""
    if not samples:
        return empty_batch()
    kinds = {type(s) for s in samples}
    if len(kinds) != 1:
        raise PrepError(
            f"batches of different types {sorted(k.__name__ for k in kinds)} cannot be concatenated",
            "homogeneous_concat_mix",
            "pass a batch_mix_fn that handles heterogeneous sources",
        )
    return generic_concat(samples)


# -------------------------------------------------------------------------------------- counting
def stratified_counts(weights: Sequence[Fraction], n: int, extras: Sequence[int], g: int) -> list[int]:
    """Largest-remainder counts for batch g: floor(n*w_i) each, plus one for the sources whose carried
    remainder is due first (released while extras[i] < (g+1)*r_i). `extras[i]` counts the +1s source i
    had in batches 0..g-1 of this phase."""
    exact = [w * n for w in weights]
    base = [math.floor(x) for x in exact]
    rem = [x - b for x, b in zip(exact, base, strict=True)]

    def key(i: int) -> tuple[bool, Fraction, int]:
        return (not (g + 1) * rem[i] > extras[i], (extras[i] + 1) / rem[i], i)

    plus = set(sorted((i for i in range(len(weights)) if rem[i] > 0), key=key)[: n - sum(base)])
    return [b + (i in plus) for i, b in enumerate(base)]


def _spread_rank(counts: Sequence[int], i: int, j: int) -> int:
    """Position of source i's j-th item in the even spread: the items of every source before it, with
    (j' + 1/2) / c' < (j + 1/2) / c_i compared exactly in integers (ties: lower source first)."""
    x, ci = 2 * j + 1, counts[i]
    pos = j
    for i2, c2 in enumerate(counts):
        if i2 != i and c2:
            m = (x * c2) // ci if i2 < i else (x * c2 - 1) // ci  # the last 2j'+1 that comes before
            pos += min(c2, (m + 1) // 2)
    return pos


def spread_before(counts: Sequence[int], t: int) -> list[int]:
    """Items of each source among the first t positions of the even spread (binary search per source)."""
    return [bisect_left(range(c), t, key=partial(_spread_rank, counts, i)) for i, c in enumerate(counts)]


def spread_window(counts: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """(items of each source before position lo, source labels of positions [lo, hi)) of the even
    spread: the j-th of source i's c_i items sits at (j + 1/2) / c_i, all sorted by that (ties: lower
    source first). O(window + sources^2 x log(batch)). Inside the window the fractions are compared as
    doubles, which order them exactly below 2**25 items (distinct ones differ by at least 1/(4n^2))."""
    first, last = spread_before(counts, lo), spread_before(counts, hi)
    labels = np.repeat(np.arange(len(counts)), [b - a for a, b in zip(first, last, strict=True)])
    pos = np.concatenate(
        [(2 * np.arange(a, b) + 1) / (2 * c) for a, b, c in zip(first, last, counts, strict=True) if b > a]
        or [np.zeros(0)]
    )
    return first, labels[np.lexsort((labels, pos))].tolist()


def spread(counts: Sequence[int]) -> list[int]:
    """Source labels evenly interleaved (`spread_window` of the whole batch); any window of the result
    holds each source's share to within 2, which is what a rank's contiguous slice needs."""
    return spread_window(counts, 0, sum(counts))[1]


def shuffled_window(
    counts: Sequence[int], lo: int, hi: int, rng: Callable[[int], np.random.Generator]
) -> tuple[list[int], list[int]]:
    """(items of each source before position lo, source labels of positions [lo, hi)) of a uniformly
    random arrangement of counts[i] items of source i, computed for the window only.

    The positions form a binary tree (node 1 is [0, n), node v's halves are 2v and 2v+1); a node splits
    its per-source counts between its halves by a multivariate hypergeometric draw from `rng(v)`, and a
    block of at most LEAF_POSITIONS shuffles its labels. That is exactly a uniform arrangement, and the
    window touches only the nodes that overlap it: O(window + sources x log(n)) work."""
    k = len(counts)
    before = np.zeros(k, dtype=np.int64)
    parts: list[np.ndarray] = []

    def visit(v: int, a: int, b: int, c: np.ndarray) -> None:
        nonlocal before
        if b <= lo:
            before += c
            return
        if a >= hi:
            return
        if np.count_nonzero(c) == 1 or b - a <= LEAF_POSITIONS:
            single = np.count_nonzero(c) == 1
            block = np.repeat(np.arange(k), c) if single else rng(v).permutation(np.repeat(np.arange(k), c))
            cut = max(lo - a, 0)
            before += np.bincount(block[:cut], minlength=k)
            parts.append(block[cut : min(hi, b) - a])
            return
        mid = (a + b) // 2
        left = rng(v).multivariate_hypergeometric(c, mid - a)
        visit(2 * v, a, mid, left)
        visit(2 * v + 1, mid, b, c - left)

    visit(1, 0, int(sum(counts)), np.asarray(counts, dtype=np.int64))
    labels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return before.tolist(), labels.tolist()


class MixPlan(Planned):
    """A mix's planned batch, O(sources) whatever the world size: `counts` per source, each source's
    `takes` (its child's planned descriptions in order — more than one when a repeating source wrapped
    into its next epoch) and the batch's (epoch, g), which key the interleave. The mix computes any
    window of its (source, reference) items with `span_refs`."""

    __slots__ = ("counts", "epoch", "g", "takes")

    def __init__(self, epoch: int, g: int, counts: Sequence[int], takes: Sequence[Sequence[Sequence[Any]]],
                 node: Node | None = None) -> None:
        super().__init__(node)
        self.epoch, self.g = epoch, g
        self.counts = tuple(counts)
        self.takes = tuple(tuple(t) for t in takes)

    def __len__(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:
        return f"MixPlan(epoch={self.epoch}, g={self.g}, counts={list(self.counts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (MixPlan, (self.epoch, self.g, self.counts, self.takes))


def tag_sample(sample: Any, name: str, sample_weight: float | None) -> Any:
    if isinstance(sample, MutableMapping):
        inner = sample.get("__source__")
        sample["__source__"] = f"{name}/{inner}" if isinstance(inner, str) else name
        if sample_weight is not None:
            inner_w = float(sample.get("__weight__", 1.0))
            sample["__weight__"] = torch.tensor(float(sample_weight) * inner_w, dtype=torch.float32)
    return sample


class MixBatchDataset(Combinator):
    """`MixBatchDataset((ds_a, 6), (ds_b, 4), batch_size=32, batch_mix_fn=..., counts=...)`.

    `batch_size` is per rank (the planned batch holds batch_size x world samples). With `repeat=True`
    (default, as energon's mix is endless) a source that ends starts its next epoch without losing
    its tail; with `repeat=False` it drops out (weight 0) and the mix's epoch ends, after one final
    short batch (dropped only if it has fewer samples than there are ranks), when every source has ended.
    """

    def __init__(
        self,
        *dataset_weights: tuple[Node, float] | Source,
        batch_size: int,
        batch_mix_fn: Callable[[list[Any]], Any] = homogeneous_concat_mix,
        counts: Counts = "multinomial",
        seed: int = 0,
        repeat: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        world_size: int | None = None,
    ) -> None:
        self.sources = parse_sources(dataset_weights, "MixBatchDataset")
        super().__init__([s.dataset for s in self.sources], "MixBatchDataset")
        if counts not in ("multinomial", "stratified"):
            raise PrepError(
                f"counts {counts!r} is not multinomial or stratified",
                "MixBatchDataset",
                "pass counts='multinomial' or counts='stratified'",
            )
        check_batch_size(batch_size, "MixBatchDataset")
        self.world = dist_info()[1] if world_size is None else world_size
        if self.world < 1:
            raise PrepError(
                f"world_size {world_size} must be at least 1",
                "MixBatchDataset",
                "pass the number of ranks, or leave it unset to read it from torch.distributed",
            )
        self.batch_size = batch_size
        self.global_batch_size = batch_size * self.world
        self.batch_mix_fn = batch_mix_fn
        self.collate_fn = collate_fn or default_collate
        self.weighted = weights_samples(self.sources)
        self.count_mode = counts
        self.seed = seed
        self.repeat = repeat
        self.reset_cursor()

    def set_epoch(self, epoch: int) -> None:
        """repeat=False: every source starts its epoch `epoch` (they end with the mix's). repeat=True: only
        the mix's counter (which keys its draws) moves and the sources go on, as under a ratio-mode blend:
        restarting them replayed a small source's earlier epochs and skipped the rest of a large one's."""
        if not self.repeat:
            super().set_epoch(epoch)
        elif epoch != self.epoch:
            self.epoch = epoch
            self.reset_cursor()

    def reset_cursor(self) -> None:
        k = len(self.sources)
        self.g = 0  # plans made this epoch: the multinomial draw's counter
        self.exhausted = [False] * k
        self.extras = [0] * k  # stratified +1s per source in this phase (since the live set changed)
        self.phase_g = 0

    # -------------------------------------------------------------------------------- planning
    def _draw_counts(self, n: int, attempt: int) -> list[int]:
        weights = [0.0 if x else s.weight for s, x in zip(self.sources, self.exhausted, strict=True)]
        if self.count_mode == "stratified":
            counts = stratified_counts(exact_weights(weights), n, self.extras, self.phase_g)
            ideal = [w * n for w in exact_weights(weights)]
            self.extras = [
                e + (c > math.floor(x)) for e, c, x in zip(self.extras, counts, ideal, strict=True)
            ]
            self.phase_g += 1
            return counts
        p = np.asarray(weights) / sum(weights)
        return (
            counter_rng(self.seed, self.path, "mix", self.epoch, self.g, attempt).multinomial(n, p).tolist()
        )

    def _take(self, i: int, n: int) -> list[Sequence[Any]]:
        """n references of source i, as its child's planned descriptions. With repeat, a source that ends
        continues in its next epoch (a source smaller than its share appears more than once in a batch);
        without, it drops out (weight 0)."""
        child = self._children[i]
        got, ended = child.take(n)
        takes, have = [got] if len(got) else [], len(got)
        while ended and self.repeat and have < n:
            got, ended = child.take(n - have)
            if ended and not len(got):
                raise PrepError(
                    f"source {self.sources[i].name!r} has no samples",
                    self.path or "MixBatchDataset",
                    "check that dataset",
                )
            takes.append(got)
            have += len(got)
        if ended and not self.repeat:  # energon's rule: an exhausted source's weight goes to 0
            self.exhausted[i] = True
            self.extras, self.phase_g = [0] * len(self.sources), 0
        return takes

    def _plan(self, n: int) -> MixPlan | None:
        """n references (fewer only when every source has ended), or None at the end of the epoch."""
        if all(self.exhausted):
            self.epoch += 1
            self.reset_cursor()
            return None
        k = len(self.sources)
        takes: list[list[Sequence[Any]]] = [[] for _ in range(k)]
        counts = [0] * k
        missing, attempt = n, 0
        while missing and not all(self.exhausted):
            for i, c in enumerate(self._draw_counts(missing, attempt)):
                if c:
                    got = self._take(i, c)
                    takes[i] += got
                    counts[i] += sum(len(t) for t in got)
            missing = n - sum(counts)
            attempt += 1
        plan = MixPlan(self.epoch, self.g, counts, takes, self)
        self.g += 1
        return plan

    def next_batch(self) -> BatchDesc:
        plan = self._plan(self.global_batch_size)
        if plan is None:
            raise StopIteration
        if len(plan) < self.world:  # nothing left, or a final tail too short to give every rank a sample
            return self.next_batch()
        return BatchDesc(self.path, plan, {"mix_counts": list(plan.counts)})

    def take(self, n: int) -> tuple[MixPlan, bool]:
        plan = self._plan(n)
        if plan is None:
            return MixPlan(self.epoch, self.g, [0] * len(self.sources), [()] * len(self.sources), self), True
        if len(plan) < n:  # fewer than n left in every source: the epoch ends, as a leaf's does
            self.epoch += 1
            self.reset_cursor()
            return plan, True
        return plan, False

    def window(self, plan: MixPlan, lo: int, hi: int) -> tuple[list[int], list[int]]:
        """(items of each source before position lo, source labels of positions [lo, hi)) of a plan."""
        if self.count_mode == "stratified":
            return spread_window(plan.counts, lo, hi)
        return shuffled_window(
            plan.counts, lo, hi,
            lambda v: counter_rng(self.seed, self.path, "mix-order", plan.epoch, plan.g, v),
        )

    def span_refs(self, span: MixPlan, lo: int, hi: int) -> list[tuple[int, Any]]:
        """(source, reference) of positions [lo, hi): each source's items in the window are the next ones
        of its takes after those before lo."""
        before, labels = self.window(span, lo, hi)
        inside = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(self.sources)).tolist()
        refs = []
        for i, (a, c) in enumerate(zip(before, inside, strict=True)):
            got: list[Any] = []
            for j, x, y in pieces_at([len(t) for t in span.takes[i]], a, a + c):
                got += self._children[i].span_refs(span.takes[i][j], x, y)
            refs.append(iter(got))
        return [(i, next(refs[i])) for i in labels]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "g": self.g,
            "exhausted": list(self.exhausted),
            "extras": list(self.extras),
            "phase_g": self.phase_g,
            "children": self.child_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.g, self.phase_g = int(state["epoch"]), int(state["g"]), int(state["phase_g"])
        self.exhausted = [bool(x) for x in state["exhausted"]]
        self.extras = [int(x) for x in state["extras"]]
        self.load_child_states(state["children"])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "mix",
            "weights": [s.weight for s in self.sources],
            "counts": self.count_mode,
            "seed": self.seed,
            "repeat": self.repeat,
            "global_batch_size": self.global_batch_size,
            "children": self.child_fingerprints(),
            **({"planner": PLANNER} if self.count_mode == "multinomial" else {}),
        }

    # --------------------------------------------------------------------------------- loading
    def fetch_samples(self, refs: Sequence[tuple[int, Any]]) -> list[Any]:
        by_src: dict[int, list[int]] = defaultdict(list)
        for pos, (i, _) in enumerate(refs):
            by_src[i].append(pos)
        out: list[Any] = [None] * len(refs)
        for i, positions in by_src.items():
            src = self.sources[i]
            loaded = self._children[i].fetch_samples([refs[p][1] for p in positions])
            for p, s in zip(positions, loaded, strict=True):
                out[p] = tag_sample(s, src.name, loss_weight(src, self.weighted))  # type: ignore[arg-type]
        return out

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        if desc.node != self.path:
            return self.fetch_desc(desc, rank, world)
        check_world(self, self.world, world)
        samples = self.fetch_samples(slice_refs(self, desc.items, rank, world))
        return self.collate_loaded([s for s in samples if s is not None])

    def collate_loaded(self, samples: list[Any]) -> Any:
        """energon's call: each sample collated as a batch of one, the list of them to `batch_mix_fn`."""
        return self.batch_mix_fn([self.collate_fn([s]) for s in samples])
