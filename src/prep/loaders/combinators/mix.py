"""`MixBatchDataset`: samples of several sources inside one batch.

Per planned global batch the counts per source are either
- `multinomial`: drawn from a counter-based generator keyed by (seed, tree path, epoch, batch), as
  energon does (at 1:2 a batch of 6 can hold 0 to 6 of the first source), or
- `stratified`: exact — every source gets floor(n*w_i) or ceil(n*w_i) (largest remainder), and the
  +1s rotate by earliest deadline so that over g batches source i totals floor or ceil of g*n*w_i
  (a fixed largest-remainder tie-break would drift: 0.6/0.4 at 32 gives 19/13, i.e. 59.4%, forever).

Positions inside the global batch interleave the sources (random for multinomial, evenly spread for
stratified), so every rank's contiguous slice gets its share (stratified: less than 2 samples off).
Each sample is collated as a batch of one and `batch_mix_fn` receives the rank's list of them, in
batch order — energon's call shape, so
`homogeneous_concat_mix` concatenates (padding tensors with `concat_pad`) and a custom function can
build anything for heterogeneous sources. Samples carry `__source__` and, when a source has a
`sample_weight`, `__weight__`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import default_collate

from prep.errors import PrepError
from prep.loaders.base import (
    BatchDesc,
    Combinator,
    Node,
    Source,
    counter_rng,
    dist_info,
    parse_sources,
    rank_slice,
    take_samples,
)
from prep.loaders.combinators.blend import exact_weights, loss_weight

Counts = Literal["multinomial", "stratified"]
_SCALAR = (str, bytes, int, float, bool, type(None))


# ----------------------------------------------------------------------------------- batch_mix_fn
def concat_pad(batch: Sequence[Any]) -> Any:
    """Concatenate tensors (or arrays) along dim 0, zero-padding every other dim to the largest size."""
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
        out: Any = first.new_zeros((total, *size))
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
    if isinstance(first, Mapping):
        keys = list(first)
        for b in batch[1:]:
            if list(b) != keys:
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
    """Mix batches of one type into one batch by concatenation (energon's helper of the same name)."""
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


def spread(counts: Sequence[int]) -> list[int]:
    """Source labels evenly interleaved: the j-th of source i's c_i items sits at (j + 1/2) / c_i and all
    are sorted by that position (ties: lower source first). Equal fractions are equal doubles (division
    is correctly rounded), so the order is exact; any window of the result holds each source's share
    to within 2, which is what a rank's contiguous slice needs."""
    labels = np.repeat(np.arange(len(counts)), counts)
    pos = np.concatenate([(2 * np.arange(c) + 1) / (2 * c) for c in counts if c] or [np.zeros(0)])
    return labels[np.lexsort((labels, pos))].tolist()


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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PrepError(
                f"batch_size {batch_size!r} must be a positive integer",
                "MixBatchDataset",
                "pass the per-rank batch size",
            )
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
        self.weighted = any(s.sample_weight is not None for s in self.sources)
        self.count_mode = counts
        self.seed = seed
        self.repeat = repeat
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

    def _take(self, i: int, n: int) -> list[Any]:
        """n references of source i. With repeat, a source that ends continues in its next epoch (a source
        smaller than its share appears more than once in a batch); without, it drops out (weight 0)."""
        child = self._children[i]
        refs, ended = take_samples(child, n)
        while ended and self.repeat and len(refs) < n:
            more, ended = take_samples(child, n - len(refs))
            if ended and not more:
                raise PrepError(
                    f"source {self.sources[i].name!r} has no samples",
                    self.path or "MixBatchDataset",
                    "check that dataset",
                )
            refs += more
        if ended and not self.repeat:  # energon's rule: an exhausted source's weight goes to 0
            self.exhausted[i] = True
            self.extras, self.phase_g = [0] * len(self.sources), 0
        return refs

    def _plan(self, n: int) -> list[tuple[int, Any]] | None:
        """n references (fewer only when every source has ended), or None at the end of the epoch."""
        if all(self.exhausted):
            self.epoch += 1
            self.reset_cursor()
            return None
        by_src: dict[int, list[Any]] = defaultdict(list)
        missing, attempt = n, 0
        while missing and not all(self.exhausted):
            for i, c in enumerate(self._draw_counts(missing, attempt)):
                if c:
                    by_src[i] += self._take(i, c)
            missing = n - sum(len(v) for v in by_src.values())
            attempt += 1
        self.g += 1
        counts = [len(by_src.get(i, ())) for i in range(len(self.sources))]
        if self.count_mode == "stratified":
            labels = spread(counts)
        else:
            labels = (
                counter_rng(self.seed, self.path, "mix-order", self.epoch, self.g)
                .permutation(np.repeat(np.arange(len(counts)), counts))
                .tolist()
            )
        pos = [0] * len(counts)
        items = []
        for i in labels:
            items.append((i, by_src[i][pos[i]]))
            pos[i] += 1
        return items

    def next_batch(self) -> BatchDesc:
        items = self._plan(self.global_batch_size)
        if items is None:
            raise StopIteration
        if len(items) < self.world:  # nothing left, or a final tail too short to give every rank a sample
            return self.next_batch()
        per_source = Counter(i for i, _ in items)
        counts = [per_source[k] for k in range(len(self.sources))]
        return BatchDesc(self.path, tuple(items), {"mix_counts": counts})

    def next_samples(self, n: int) -> list[tuple[int, Any]]:
        items = self._plan(n)
        if items is None or len(items) < n:
            if items is not None:  # fewer than n left in every source: the tail is dropped, as a leaf does
                self.epoch += 1
                self.reset_cursor()
            raise StopIteration
        return items

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
        samples = self.fetch_samples(desc.items[rank_slice(len(desc.items), rank, world)])
        return self.batch_mix_fn([self.collate_fn([s]) for s in samples if s is not None])
