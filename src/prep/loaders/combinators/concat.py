"""`ConcatDataset`: its children one after another, for validation sets and curricula.

The cursor is (part k, every child's cursor), so a run stopped inside part 2 resumes inside part 2 on
the exact next batch. (Megatron-Energon's concat restarts from the first dataset on resume; prep does
not.) A concat's batch is its child's batch, so it can also sit under a mix (sample references carry
the part index).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from prep.loaders.base import BatchDesc, Combinator, Node, Pieces, pieces_at, sum_of_sizes


class ConcatDataset(Combinator):
    """`ConcatDataset(ds_a, ds_b, ...)`: all batches of ds_a's epoch, then ds_b's, ... then StopIteration."""

    def __init__(self, *datasets: Node) -> None:
        super().__init__(list(datasets), "ConcatDataset")
        self.k = 0

    def reset_cursor(self) -> None:
        self.k = 0

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.k = 0

    def next_batch(self) -> BatchDesc:
        while self.k < len(self._children):
            try:
                return self._children[self.k].next_batch()
            except StopIteration:
                self.k += 1
        self._end_epoch()
        raise StopIteration

    def take(self, n: int) -> tuple[Pieces, bool]:
        """Up to n references, crossing part boundaries (a part that returns fewer than asked has ended);
        their items read as (part, reference)."""
        parts: list[tuple[int, Any]] = []
        have = 0
        while self.k < len(self._children):
            got, _ = self._children[self.k].take(n - have)
            if len(got):
                parts.append((self.k, got))
                have += len(got)
            if have == n:
                return Pieces(parts, self), False
            self.k += 1
        self._end_epoch()
        return Pieces(parts, self), True

    def span_refs(self, span: Pieces, lo: int, hi: int) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for j, a, b in pieces_at(span.lengths, lo, hi):
            k, got = span.parts[j]
            out += [(k, r) for r in self._children[k].span_refs(got, a, b)]
        return out

    def batches_per_epoch(self) -> int | None:
        return sum_of_sizes([c.batches_per_epoch() for c in self._children])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "k": self.k, "children": self.child_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.k = int(state["epoch"]), int(state["k"])
        self.load_child_states(state["children"])

    def fingerprint(self) -> dict[str, Any]:
        return {"type": "concat", "children": self.child_fingerprints()}

    def fetch_samples(self, refs: Sequence[tuple[int, Any]]) -> list[dict[str, Any] | None]:
        by_part: dict[int, list[int]] = defaultdict(list)
        for pos, (k, _) in enumerate(refs):
            by_part[k].append(pos)
        out: list[dict[str, Any] | None] = [None] * len(refs)
        for k, positions in by_part.items():
            loaded = self._children[k].fetch_samples([refs[p][1] for p in positions])
            for pos, sample in zip(positions, loaded, strict=True):
                out[pos] = sample
        return out
