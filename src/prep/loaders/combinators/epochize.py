"""`EpochizeDataset`: virtual epochs of `length` batches over an endless (or restarting) stream.

Training recipes measure progress in fixed-size epochs while the data is a repeated blend or a
dataset whose real epoch is too long to wait for. The child's stream is never restarted by a virtual
epoch: epoch e+1 continues where epoch e stopped, and a finite child simply starts its next epoch.
"""

from __future__ import annotations

from typing import Any

from prep.errors import PrepError
from prep.loaders.base import BatchDesc, Combinator, Node


class EpochizeDataset(Combinator):
    """`EpochizeDataset(ds, length)`: every epoch yields exactly `length` batches of ds's stream."""

    def __init__(self, dataset: Node, length: int) -> None:
        super().__init__([dataset], "EpochizeDataset")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise PrepError(
                f"length {length!r} must be a positive number of batches",
                "EpochizeDataset",
                "pass how many batches one virtual epoch has",
            )
        self.length = length
        self.i = 0

    @property
    def child(self) -> Node:
        return self._children[0]

    def set_epoch(self, epoch: int) -> None:
        """Only the virtual epoch counter moves; the child's stream goes on (no restart, no repeats)."""
        if epoch != self.epoch:
            self.epoch, self.i = epoch, 0

    def next_batch(self) -> BatchDesc:
        if self.i >= self.length:
            self.epoch += 1
            self.i = 0
            raise StopIteration
        try:
            d = self.child.next_batch()
        except StopIteration:  # the child's epoch ended and its cursor is at its next epoch
            try:
                d = self.child.next_batch()
            except StopIteration:
                raise PrepError(
                    "the wrapped dataset has no batches",
                    self.path or "EpochizeDataset",
                    "check the dataset (empty, or drop_last with fewer samples than a batch)",
                ) from None
        self.i += 1
        return d

    def batches_per_epoch(self) -> int:
        return self.length

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "i": self.i, "child": self.child.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.i = int(state["epoch"]), int(state["i"])
        self.child.load_state_dict(state["child"])

    def fingerprint(self) -> dict[str, Any]:
        return {"type": "epochize", "length": self.length, "child": self.child.fingerprint()}
