"""Metrics and the rules that end a step early: pure state, JSON in and out, so a resume continues the
moving averages, patience counters and plateau bests exactly where they were.

- `Metrics`: a moving average (window W) of every metric a trainer reports, plus a history of what was
  seen at each check and validation (saved in checkpoints; FluxFlow documented one and saved none).
- `Transition`: `loss_threshold` (the watched value below/above `threshold` for `patience` consecutive
  checks) and `plateau` (no improvement by `min_delta` for `patience` checks). `epoch` and `max_steps`
  end by the step's length alone (see `prep.pipeline.plan.step_length`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prep.pipeline.config import TransitionConfig


@dataclass
class Metrics:
    window: int
    recent: dict[str, deque[float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    validations: int = 0  # how many validations set `val`: a rule on it counts each once

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.recent.setdefault(k, deque(maxlen=self.window)).append(float(v))

    def averages(self) -> dict[str, float]:
        return {k: math.fsum(d) / len(d) for k, d in self.recent.items() if d}

    def record(self, kind: str, at: int, values: dict[str, float]) -> None:
        self.history.append({"kind": kind, "batch": at, **{k: float(v) for k, v in values.items()}})

    def set_val(self, at: int, values: dict[str, float]) -> None:
        """A validation's metrics, after `at` batches of the step."""
        self.val = dict(values)
        self.validations += 1
        self.record("val", at, values)

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "recent": {k: list(d) for k, d in self.recent.items()},
            "history": list(self.history),
            "val": dict(self.val),
            "validations": self.validations,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Metrics:
        m = cls(int(state["window"]))
        m.recent = {k: deque(v, maxlen=m.window) for k, v in state["recent"].items()}
        m.history = list(state["history"])
        m.val = dict(state["val"])
        m.validations = int(state.get("validations", 0))
        return m


@dataclass
class Transition:
    """Patience bookkeeping of one step's early-transition rule."""

    rule: TransitionConfig
    count: int = 0
    best: float | None = None
    checks: int = 0
    validations: int = 0  # the validation a `source: val` rule last looked at

    def watched(self, metrics: Metrics) -> float | None:
        if self.rule.metric is None:
            return None
        source = metrics.val if self.rule.source == "val" else metrics.averages()
        return source.get(self.rule.metric)

    def check(self, metrics: Metrics) -> str | None:
        """Count one check; return the reason when the rule fires (None otherwise, and always for the
        length-only modes). A metric that is not reported yet counts as a failed check; a validation
        metric is looked at once per validation (a check with no new validation is none)."""
        r = self.rule
        if r.mode not in ("loss_threshold", "plateau"):
            return None
        if r.source == "val":
            if metrics.validations == self.validations:
                return None
            self.validations = metrics.validations
        self.checks += 1
        value = self.watched(metrics)
        sign = 1.0 if r.direction == "min" else -1.0
        if r.mode == "loss_threshold":
            ok = value is not None and sign * value < sign * float(r.threshold)  # type: ignore[arg-type]
            self.count = self.count + 1 if ok else 0
            if self.count >= r.patience:
                op = "<" if r.direction == "min" else ">"
                return (
                    f"loss_threshold: {r.source} {r.metric} = {value:.6g} {op} {r.threshold} for "
                    f"{r.patience} consecutive checks"
                )
            return None
        if value is None:
            return None
        if self.best is None or sign * value < sign * self.best - r.min_delta:
            self.best, self.count = value, 0
            return None
        self.count += 1
        if self.count >= r.patience:
            return (
                f"plateau: {r.source} {r.metric} did not improve on {self.best:.6g} by {r.min_delta} "
                f"for {r.patience} checks"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "best": self.best,
            "checks": self.checks,
            "validations": self.validations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.best, self.checks = int(state["count"]), state["best"], int(state["checks"])
        self.validations = int(state.get("validations", 0))
