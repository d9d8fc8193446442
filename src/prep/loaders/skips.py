"""Bad samples: skipped, counted, reported — or raised, as the leaf's `on_error` says.

A sample whose bytes cannot become a training sample (a corrupt image, a missing or malformed member, an
unreadable tar record, an image file gone) raises `BadSample` where it is decoded. With
`on_error="skip"` (the default) the leaf drops it from its batch and records it here; whether a sample
is bad depends only on its bytes, so the batches, and a resume, stay exact. Records travel from the
workers to the main process with each batch; `SkipStats` counts them per reason and key, warns at most
once a minute, and raises once a leaf's distinct bad samples exceed its `max_skip_fraction`.
I/O errors (a shard or server gone) are never skipped: they are not a property of a sample.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from prep.errors import PrepError

OnError = Literal["skip", "raise"]
WARN_EVERY_S = 60.0  # at most one warning a minute (the first skip warns at once)


class BadSample(PrepError):
    """A sample that cannot be loaded because of its own bytes. `reason` is a short category."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None, *,
                 reason: str = "bad sample", key: str | None = None) -> None:
        self.reason = reason
        self.key = key
        super().__init__(what, where, fix)

    def __reduce__(self):
        return (_bad_sample, (self.what, self.where, self.fix, self.reason, self.key))


def _bad_sample(what: str, where: str | None, fix: str | None, reason: str, key: str | None) -> BadSample:
    return BadSample(what, where, fix, reason=reason, key=key)


@dataclass(frozen=True, slots=True)
class Skip:
    """One skipped sample: the leaf (tree path) that planned it, why, its key and where it lives."""

    leaf: str
    reason: str
    key: str
    where: str
    message: str
    fix: str = ""


def check_policy(on_error: str, max_skip_fraction: float, where: str) -> None:
    if on_error not in ("skip", "raise"):
        raise PrepError(f"on_error={on_error!r} is not skip or raise", where,
                        "pass on_error='skip' (count and drop bad samples) or on_error='raise'")
    if not 0 <= max_skip_fraction <= 1:
        raise PrepError(f"max_skip_fraction={max_skip_fraction!r} is not in [0, 1]", where,
                        "pass the share of a dataset's samples that may be bad, e.g. 0.05")


# ------------------------------------------------------------------------------ collecting (workers)
_RECORDS: list[Skip] | None = None
_LEAF = ""


@contextmanager
def collecting() -> Iterator[list[Skip]]:
    """Collect the skips of one request (a worker's fetch, or an in-process one)."""
    global _RECORDS
    outer, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        if outer is not None:
            outer += _RECORDS
        _RECORDS = outer


@contextmanager
def leaf(path: str) -> Iterator[None]:
    """Attribute the skips recorded inside to the leaf at `path`."""
    global _LEAF
    outer, _LEAF = _LEAF, path
    try:
        yield
    finally:
        _LEAF = outer


def skip_or_raise(err: BadSample, on_error: OnError, key: str) -> None:
    """Record a bad sample (skip), or raise it (raise)."""
    if on_error == "raise":
        raise err
    if _RECORDS is not None:
        _RECORDS.append(Skip(_LEAF, err.reason, err.key or key, err.where or "", err.what, err.fix or ""))


# ------------------------------------------------------------------------------ counting (main process)
class SkipStats:
    """What was skipped so far, per reason and per key, with the rate-limited warning and the
    max_skip_fraction check. `limits` maps a leaf's path to (its samples per epoch, its fraction)."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_key: Counter[str] = Counter()
        self.keys_by_leaf: dict[str, set[str]] = {}
        self.last: Skip | None = None
        self._warned_at: float | None = None
        self._unwarned = 0

    def add(self, records: list[Skip], limits: dict[str, tuple[int, float]]) -> None:
        for r in records:
            self.by_reason[r.reason] += 1
            name = f"{r.where} {r.key}" if r.key and r.key not in r.where else r.where or r.key
            self.by_key[name] += 1
            self.keys_by_leaf.setdefault(r.leaf, set()).add(name)
            self.last = r
            self._unwarned += 1
            total, fraction = limits.get(r.leaf, (0, 1.0))
            bad = len(self.keys_by_leaf[r.leaf])
            if total and bad > fraction * total:
                raise PrepError(
                    f"{bad} of {total} samples are bad, more than max_skip_fraction={fraction} "
                    f"({dict(self.by_reason)}); the last: {r.message}",
                    r.where or r.leaf or "loader",
                    f"{r.fix or 'repair or re-create the damaged shards or images'}; "
                    "or raise max_skip_fraction")
        if records:
            self._maybe_warn()

    def _maybe_warn(self) -> None:
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        assert self.last is not None
        warnings.warn(
            f"prep loader skipped {self._unwarned} bad sample(s) since the last warning, "
            f"{sum(self.by_reason.values())} in all ({dict(self.by_reason)}); the last: {self.last.where}: "
            f"{self.last.message} (see loader.stats(); on_error='raise' stops instead)",
            RuntimeWarning, stacklevel=4)
        self._unwarned = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": sum(self.by_reason.values()),
            "by_reason": dict(self.by_reason),
            "by_key": dict(self.by_key),
        }
