"""Retries of remote reads: the one policy every remote path uses (ranged sample reads, whole-shard cache
downloads, `.idx` and manifest fetches, the hub).

Why: a run that streams from an object store for days meets 503s, throttling and cut connections; one
such failure must not end it. Only transient failures are retried (5xx, 408, 425, 429, timeouts, refused,
reset or cut connections, a body shorter than the range asked for); any other answer (401, 403, 404,
416, a server that ignores Range) fails at once, because asking again gets the same answer. A retried
request asks for the same byte range again and the caller writes or returns only a complete answer, so
the bytes, the order and a resume are what an unfailed read gives.

`decide` is the pure rule (attempt, failure, policy -> seconds to wait, or give up); `call` runs a request
under it. Each retry is counted per process (`drain`); the DataLoader sums the counts that come with the
batches into `loader.stats()["retries"]` and warns at most once a minute (`RetryStats`).
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prep.errors import PrepError
from prep.formats.urls import http_status, is_transient_status, network_failure

T = TypeVar("T")
WARN_EVERY_S = 60.0  # at most one warning a minute (the first retry warns at once)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How remote reads are retried (`ShardDataset(retry=...)`).

    Args:
        retries: tries after the first that failed transiently (0: fail at the first failure).
        base_delay: seconds before the first retry; each next one waits twice as long, with jitter (a
            random share of up to half the wait, so readers that failed together do not return together).
        max_delay: the longest wait between tries, a server's `Retry-After` included.
        timeout: seconds a connection may stay silent before the request counts as failed (transient).
    """

    retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise PrepError(f"retries={self.retries!r} is not a whole number >= 0", "RetryPolicy",
                            "pass how many times a failed remote read is tried again, e.g. 5 (0: never)")
        for name in ("base_delay", "max_delay", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise PrepError(f"{name}={value!r} is not a number of seconds >= 0", "RetryPolicy",
                                f"pass {name} in seconds, e.g. {getattr(RetryPolicy, name)}")
        if self.timeout == 0:
            raise PrepError("timeout=0 would fail every request", "RetryPolicy",
                            "pass the seconds a connection may stay silent, e.g. 60")


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed remote request as the policy sees it: the HTTP status (None: the network failed), a short
    text without any URL, whether trying again may help, and the server's `Retry-After` in seconds."""

    status: int | None
    detail: str
    transient: bool
    retry_after: float | None = None

    @property
    def reason(self) -> str:
        """The category counted in `loader.stats()`: the status, or what the network did."""
        return f"HTTP {self.status}" if self.status else self.detail.split(":", 1)[0]


def decide(attempt: int, failure: Failure, policy: RetryPolicy, draw: float) -> float | None:
    """Seconds to wait before trying again after the `attempt`-th try (1-based) failed, or None to give up.
    `draw` in [0, 1) is the jitter's random number (an argument, so the rule is a pure function)."""
    if not failure.transient or attempt > policy.retries:
        return None
    if failure.retry_after is not None:
        return min(max(failure.retry_after, 0.0), policy.max_delay)
    wait = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
    return wait / 2 + draw * wait / 2


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header's wait in seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(err: BaseException) -> Failure | None:
    """The failure a remote request's exception stands for; None when it is not one (a PrepError, a local
    write that failed): that is raised as it is, never retried."""
    if isinstance(err, PrepError):
        return None
    status = http_status(err)
    if status is not None:
        headers = getattr(err, "headers", None) or getattr(getattr(err, "response", None), "headers", None)
        after = getattr(err, "retry_after", None)
        if after is None and headers is not None:
            after = retry_after_seconds(headers.get("Retry-After"))
        reason = getattr(err, "reason", None) or getattr(err, "message", None) or ""
        # prep's own FetchError text holds no URL; other libraries' may, so only the status is kept
        detail = str(err) if type(err).__name__ == "FetchError" else f"HTTP {status} {reason}".strip()
        return Failure(status, detail if "://" not in detail else f"HTTP {status}",
                       is_transient_status(status), after)
    if isinstance(err, FileNotFoundError):
        return Failure(404, "HTTP 404 (not found)", False)
    if isinstance(err, PermissionError):
        return Failure(403, "HTTP 403 (forbidden)", False)
    if type(err).__name__ == "FetchError":  # prep's own, without a status: the network failed
        return Failure(None, str(err), True)
    how = network_failure(err)
    if how is None:
        return None
    said = {"timeout": "timeout", "cut": "connection cut", "connection": "connection failed"}[how]
    return Failure(None, f"{said}: {type(err).__name__}", True)


# ------------------------------------------------------------------------------- counting (any process)
_LOCK = threading.Lock()
_COUNTS: Counter[str] = Counter()
_LAST: list[str] = []


def _note(where: str, failure: Failure) -> None:
    with _LOCK:
        _COUNTS[failure.reason] += 1
        _LAST[:] = [f"{where}: {failure.detail}"]


Retried = tuple[dict[str, int], str] | None  # what `drain` hands over: counts per reason, the last one


def drain() -> Retried:
    """This process's retries since the last call (per reason, and the last one), or None when none."""
    with _LOCK:
        if not _COUNTS:
            return None
        got = (dict(_COUNTS), _LAST[0] if _LAST else "")
        _COUNTS.clear()
        return got


def _fresh_lock() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a thread of the parent may have held it at the fork
    _COUNTS.clear()  # the parent's retries are the parent's to report


os.register_at_fork(after_in_child=_fresh_lock)


class RetryStats:
    """The retries of every process a DataLoader drives, summed in the main process, with a warning at
    most once a minute."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.last = ""
        self._warned_at: float | None = None
        self._unwarned = 0

    def add(self, drained: Retried) -> None:
        if drained is None:
            return
        counts, last = drained
        self.by_reason.update(counts)
        self.last = last or self.last
        self._unwarned += sum(counts.values())
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        warnings.warn(
            f"prep loader retried {self._unwarned} remote read(s) since the last warning, "
            f"{sum(self.by_reason.values())} in all ({dict(self.by_reason)}); the last: {self.last} "
            "(see loader.stats()['retries']; ShardDataset(retry=RetryPolicy(...)) sets the policy)",
            RuntimeWarning, stacklevel=4)
        self._unwarned = 0

    def as_dict(self) -> dict[str, Any]:
        return {"count": sum(self.by_reason.values()), "by_reason": dict(self.by_reason), "last": self.last}


# ------------------------------------------------------------------------------------------ retrying
class Attempts:
    """The tries of one request (or of one round of requests made together): counts them, and after a
    failure either waits as `decide` says or raises the one-line PrepError (`gave_up`)."""

    def __init__(self, policy: RetryPolicy, what: str, fix: Callable[[Failure], str] | None = None) -> None:
        self.policy, self.what, self.fix = policy, what, fix
        self.started = time.monotonic()
        self.tries = 0

    def failed(self, failure: Failure, where: str, requests: int = 1) -> None:
        """The latest try failed (`requests` requests of it, all retried together): wait before the next
        one, or raise. `where` is the redacted URL."""
        self.tries += 1
        wait = decide(self.tries, failure, self.policy, random.random())
        if wait is None:
            raise gave_up(failure, where, self.what, self.tries, time.monotonic() - self.started, self.fix)
        for _ in range(requests):
            _note(where, failure)
        time.sleep(wait)


def call(fn: Callable[[], T], policy: RetryPolicy, where: str, what: str,
         fix: Callable[[Failure], str] | None = None) -> T:
    """`fn()`, tried again under `policy` while it fails transiently. A failure that is not transient, or
    the last one, raises the one-line PrepError (`gave_up`); `where` is the redacted URL. An exception
    that is no remote failure (`classify`: a PrepError, a failed local write) is raised as it is."""
    attempts = Attempts(policy, what, fix)
    while True:
        try:
            return fn()
        except Exception as err:
            failure = classify(err)
            if failure is None:
                raise
        attempts.failed(failure, where)


def gave_up(failure: Failure, where: str, what: str, attempts: int, seconds: float,
            fix: Callable[[Failure], str] | None = None) -> PrepError:
    """The one line for a remote read that failed for good: what failed, the last answer and, for a
    transient failure, how many tries over how long."""
    if not failure.transient:
        return PrepError(f"cannot {what} ({failure.detail})", where, (fix or permanent_fix)(failure))
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''} over {seconds:.1f} s"
    return PrepError(
        f"cannot {what} ({failure.detail}; {tries})", where,
        "check that the store is up and reachable; to wait longer for it, pass "
        "ShardDataset(retry=RetryPolicy(retries=..., max_delay=...))")


def permanent_fix(failure: Failure) -> str:
    """What to do about an answer that asking again would not change."""
    if failure.status in (401, 403):
        return "check the token (sent as an Authorization header) and that the URL is readable"
    if failure.status == 200:
        return "serve the shards with HTTP Range support"
    if failure.status == 404:
        return "check the URL: the file is not on the server"
    if failure.status == 416:
        return "the file is shorter than its listing says: regenerate its .idx and manifest.json"
    return "check the URL and that the server is reachable"
