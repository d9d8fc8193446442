"""`BlendDataset`: each batch is a whole batch of one source, the source chosen by weight.

Weights are shares of batches, and by default they hold (`mode="ratio"`): a source that ends its
epoch starts its next one (reshuffled), so over any stretch of the stream source i has a share w_i of
the batches whatever the sources' sizes, and the blend's epoch is a number of batches (`epoch_batches`,
by default the sum of the sources' epochs, so one epoch still shows about as many batches as they hold).
Energon's exhaustion rule stays available as `mode="exhaust"`: a source that ends gets weight 0, the
others go on, the epoch ends when all have ended, and each source's batches appear once per epoch
whatever the weights (a warning says so when that is far from them).

Two schedules, both pure functions of the blend's cursor (no replay on resume):
- `smooth`: deterministic weighted round-robin (earliest-deadline-first over each source's quota), so
  after any g batches source i has had floor(g*w_i) or ceil(g*w_i) of them — no long runs of one source;
- `random`: the smooth schedule's picks for each block of `BLOCK` batches, in an order drawn from a
  counter-based generator keyed by (seed, tree path, block): random inside a block, the weights exact at
  every block's end, so shares hold to within a block at any point and runs are those of a shuffle.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import torch

from prep.errors import PrepError
from prep.loaders.base import (
    BatchDesc,
    Combinator,
    Node,
    Source,
    counter_rng,
    known_sizes,
    parse_sources,
    sum_of_sizes,
    weights_samples,
)

Schedule = Literal["random", "smooth"]
Mode = Literal["ratio", "exhaust"]
BLOCK = 64  # batches per block of the random schedule: shares are exact at each block's end
_SHARE_SLACK = 0.02  # exhaust mode warns when a source's share of an epoch is this far from its weight


def exact_weights(weights: Sequence[float]) -> list[Fraction]:
    """Weights normalised exactly (floats are exact binary fractions), so quota bounds hold exactly."""
    fr = [Fraction(w) for w in weights]
    total = sum(fr)
    return [w / total for w in fr]


def smooth_pick(weights: Sequence[Fraction], counts: Sequence[int]) -> int:
    """The next source of a weighted round-robin with quota bounds.

    At pick t = sum(counts) + 1, source i may be picked only while counts[i] < t*w_i (its ceiling) and
    the one whose next pick is due first — smallest (counts[i] + 1) / w_i — is taken (ties: lowest
    index). Earliest-deadline-first is optimal for unit jobs, and a schedule meeting every
    floor/ceil bound exists (Tijdeman's chairman assignment), so the bounds always hold.
    """
    t = sum(counts) + 1
    best: tuple[Fraction, int] | None = None
    for i, (w, c) in enumerate(zip(weights, counts, strict=True)):
        if w > 0 and w * t > c:
            due = (c + 1) / w
            if best is None or due < best[0]:
                best = (due, i)
    if best is None:
        raise PrepError("no source has a positive weight", "smooth schedule", "give a source a weight > 0")
    return best[1]


def random_pick(weights: Sequence[float], u: float) -> int:
    """Inverse-CDF choice of a source for a uniform draw u in [0, 1) (zero weights never chosen)."""
    total = sum(weights)
    acc = 0.0
    last = max(i for i, w in enumerate(weights) if w > 0)
    for i, w in enumerate(weights):
        acc += w
        if w > 0 and u * total < acc:
            return i
    return last


def loss_weight(src: Source, weighted: bool) -> float | None:
    """A source's sample weight; 1.0 for the others once any source has one, so batches keep one layout."""
    if src.sample_weight is not None:
        return src.sample_weight
    return 1.0 if weighted else None


def batch_len(batch: Mapping[str, Any]) -> int | None:
    """Samples in a collated dict batch: the length of `__key__`, else the first sized value."""
    if "__key__" in batch:
        return len(batch["__key__"])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
        if isinstance(v, list | tuple):
            return len(v)
    return None


def tag_batch(batch: Any, name: str, sample_weight: float | None) -> Any:
    """Add `__source__` (per-sample names, nested as outer/inner) and, with a sample weight, multiply
    `__weight__` into a dict batch. Other batch types pass unchanged."""
    if not isinstance(batch, MutableMapping):
        return batch
    n = batch_len(batch)
    if n is None:
        return batch
    inner = batch.get("__source__")
    if isinstance(inner, list | tuple) and len(inner) == n:
        batch["__source__"] = [f"{name}/{s}" for s in inner]
    else:
        batch["__source__"] = [name] * n
    if sample_weight is not None:
        w = torch.full((n,), float(sample_weight), dtype=torch.float32)
        old = batch.get("__weight__")
        batch["__weight__"] = w * old if isinstance(old, torch.Tensor) and old.shape == w.shape else w
    return batch


def exhaust_shares(batches: Sequence[int | None]) -> list[float] | None:
    """Each source's share of an exhaust-mode epoch (its batches over all), or None for an endless one."""
    known = known_sizes(batches)
    if known is None or not sum(known):
        return None
    total = sum(known)
    return [b / total for b in known]


def smooth_block(weights: Sequence[Fraction], counts: Sequence[int], n: int) -> list[int]:
    """The next n picks of the smooth schedule from `counts` (the random schedule's block content)."""
    counts = list(counts)
    out = []
    for _ in range(n):
        i = smooth_pick(weights, counts)
        counts[i] += 1
        out.append(i)
    return out


class BlendDataset(Combinator):
    """`BlendDataset((ds_a, 0.6), (ds_b, 0.4), seed=0, schedule="random"|"smooth", mode="ratio"|"exhaust")`.

    `mode="ratio"` (default): sources repeat, the weights are the shares of batches, and an epoch is
    `epoch_batches` batches (default: the sum of the sources' batches per epoch; endless when a source
    has no fixed length). `mode="exhaust"`: energon's rule (see the module docstring). `repeat=` is the
    older spelling: `repeat=True` is an endless ratio blend, `repeat=False` the exhaust mode.

    Each source keeps its own batch size. The batch carries `__source__` (and `__weight__` when a
    source has a `sample_weight`) when it is a dict.
    """

    def __init__(
        self,
        *dataset_weights: tuple[Node, float] | Source,
        seed: int = 0,
        schedule: Schedule = "random",
        mode: Mode | None = None,
        epoch_batches: int | None = None,
        repeat: bool | None = None,
    ) -> None:
        self.sources = parse_sources(dataset_weights, "BlendDataset")
        super().__init__([s.dataset for s in self.sources], "BlendDataset")
        if schedule not in ("random", "smooth"):
            raise PrepError(
                f"schedule {schedule!r} is not random or smooth",
                "BlendDataset",
                "pass schedule='random' or schedule='smooth'",
            )
        self.mode, self.length = _resolve_mode(mode, repeat, epoch_batches, self._children)
        self.weighted = weights_samples(self.sources)
        self.seed = seed
        self.schedule = schedule
        self._block: tuple[tuple[Any, ...], list[int]] | None = None
        self.reset_cursor()
        self.counts = [0] * len(self.sources)  # picks per source (exhaust mode: since the live set changed)
        self.block_counts = [0] * len(self.sources)
        _warn_unheld_weights(self.mode, self.length, self.sources, self._children)

    @property
    def repeat(self) -> bool:
        """Whether sources start their next epoch when they end (ratio mode)."""
        return self.mode == "ratio"

    def reset_cursor(self) -> None:
        k = len(self.sources)
        self.g = 0  # batches planned this epoch
        self.exhausted = [False] * k
        if self.mode == "exhaust":  # ratio mode: the schedule runs on across epochs, so shares stay exact
            self.counts = [0] * k
            self.block_counts = [0] * k

    def set_epoch(self, epoch: int) -> None:
        """Exhaust mode: every source starts its epoch `epoch`. Ratio mode: only the blend's epoch counter
        moves; the sources go on (their epochs are not the blend's), as under EpochizeDataset."""
        if self.mode == "exhaust":
            super().set_epoch(epoch)
        elif epoch != self.epoch:
            self.epoch, self.g = epoch, 0

    def _weights(self) -> list[float]:
        return [0.0 if x else s.weight for s, x in zip(self.sources, self.exhausted, strict=True)]

    def _choose(self) -> int:
        weights = exact_weights(self._weights())
        if self.schedule == "smooth":
            return smooth_pick(weights, self.counts)
        b, j = divmod(sum(self.counts), BLOCK)
        if j == 0:
            self.block_counts = list(self.counts)
        phase = (self.epoch, sum(self.exhausted)) if self.mode == "exhaust" else (0, 0)
        tag = (*phase, b, tuple(self.block_counts))
        if self._block is None or self._block[0] != tag:
            picks = smooth_block(weights, self.block_counts, BLOCK)
            order = counter_rng(self.seed, self.path, "blend", *phase, b).permutation(BLOCK)
            self._block = (tag, [picks[k] for k in order])
        return self._block[1][j]

    def _next_from(self, i: int) -> BatchDesc | None:
        child = self._children[i]
        try:
            return child.next_batch()
        except StopIteration:
            if not self.repeat:
                return None
        try:  # the child moved to its next epoch; a second end means it has no batches at all
            return child.next_batch()
        except StopIteration:
            raise PrepError(
                f"source {self.sources[i].name!r} has no batches",
                self.path or "BlendDataset",
                "check that dataset (empty, or drop_last with fewer samples than a batch)",
            ) from None

    def _end_epoch(self) -> StopIteration:
        self.epoch += 1
        self.reset_cursor()
        return StopIteration()

    def next_batch(self) -> BatchDesc:
        if self.mode == "ratio" and self.length is not None and self.g >= self.length:
            raise self._end_epoch()
        while not all(self.exhausted):
            i = self._choose()
            d = self._next_from(i)
            if d is None:  # energon's rule: an exhausted source's weight goes to 0
                self.exhausted[i] = True
                self.counts = [0] * len(self.sources)
                continue
            self.g += 1
            self.counts[i] += 1
            return BatchDesc(self.path, (i, d), {**d.info, "source": self.sources[i].name})
        raise self._end_epoch()

    def batches_per_epoch(self) -> int | None:
        if self.mode == "ratio":
            return self.length
        return sum_of_sizes([c.batches_per_epoch() for c in self._children])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "g": self.g,
            "exhausted": list(self.exhausted),
            "counts": list(self.counts),
            "block_counts": list(self.block_counts),
            "children": self.child_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.g = int(state["epoch"]), int(state["g"])
        self.exhausted = [bool(x) for x in state["exhausted"]]
        self.counts = [int(x) for x in state["counts"]]
        self.block_counts = [int(x) for x in state["block_counts"]]
        self.load_child_states(state["children"])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "blend",
            "weights": [s.weight for s in self.sources],
            "seed": self.seed,
            "schedule": self.schedule,
            "mode": self.mode,
            "epoch_batches": self.length,
            "children": self.child_fingerprints(),
        }

    def fetch(self, desc: BatchDesc, rank: int, world: int) -> Any:
        if desc.node != self.path:
            return self.fetch_desc(desc, rank, world)
        i, d = desc.items
        src = self.sources[i]
        return tag_batch(self.fetch_desc(d, rank, world), src.name, loss_weight(src, self.weighted))


def _resolve_mode(
    mode: str | None, repeat: bool | None, epoch_batches: int | None, children: Sequence[Node]
) -> tuple[Mode, int | None]:
    """(mode, batches per ratio-mode epoch or None for endless) from the arguments, `repeat` included."""
    if mode is not None and mode not in ("ratio", "exhaust"):
        raise PrepError(f"mode {mode!r} is not ratio or exhaust", "BlendDataset",
                        "pass mode='ratio' (weights hold) or mode='exhaust' (energon's rule)")
    if repeat is not None and mode is not None and (mode == "ratio") != bool(repeat):
        raise PrepError(f"repeat={repeat} contradicts mode={mode!r}", "BlendDataset",
                        "pass only mode= (repeat= is its older spelling)")
    if epoch_batches is not None and (
        isinstance(epoch_batches, bool) or not isinstance(epoch_batches, int) or epoch_batches < 1
    ):
        raise PrepError(f"epoch_batches={epoch_batches!r} is not a positive number of batches",
                        "BlendDataset", "pass an integer >= 1, or leave it unset")
    if mode == "exhaust" or repeat is False:
        if epoch_batches is not None:
            raise PrepError("epoch_batches applies to mode='ratio' only", "BlendDataset",
                            "an exhaust-mode epoch ends when every source has ended")
        return "exhaust", None
    if repeat is True or epoch_batches is not None:
        return "ratio", epoch_batches
    return "ratio", sum_of_sizes([c.batches_per_epoch() for c in children])


def _warn_unheld_weights(
    mode: Mode, length: int | None, sources: Sequence[Source], children: Sequence[Node]
) -> None:
    """Say when a configuration cannot hold its weights: exhaust mode shows each source's batches once
    per epoch (shares = sizes), and a ratio-mode epoch too short to give the lightest source a batch."""
    weights = [float(w) for w in exact_weights([s.weight for s in sources])]
    if mode == "ratio":
        if length is not None and length * min(weights) < 1:
            light = sources[weights.index(min(weights))].name
            warnings.warn(
                f"BlendDataset: an epoch of {length} batches is too short for source {light!r} at weight "
                f"{min(weights):.3g} to have a batch in every epoch (the shares hold over the stream, not "
                "per epoch); pass a larger epoch_batches", UserWarning, stacklevel=3)
        return
    shares = exhaust_shares([c.batches_per_epoch() for c in children])
    if shares is not None and max(abs(a - b) for a, b in zip(shares, weights, strict=True)) > _SHARE_SLACK:
        warnings.warn(
            f"BlendDataset(mode='exhaust'): the sources' batches per epoch give shares "
            f"{[round(x, 3) for x in shares]}, not the weights {[round(x, 3) for x in weights]} (each "
            "source's batches appear once per epoch); pass mode='ratio' for weights that hold",
            UserWarning, stacklevel=3)
