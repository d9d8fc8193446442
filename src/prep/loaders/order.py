"""The sample order of a shard dataset: a pure function of (seed, epoch, shard counts, window size).

For epoch e the shards are shuffled by a seeded counter-based RNG, consecutive groups of
`window_shards` shards form windows, and the samples of each window are permuted together by a
seeded permutation (a bijection, so every sample appears exactly once). Any position of the epoch maps
to (shard, sample) directly: find the window by binary search, then look the position up in that
window's permutation, computed on demand and cached (and resolved to shard and sample a block of
positions at a time). Nothing is replayed, so resuming at batch 3,000 costs what resuming at batch 3
does, and the order never depends on ranks or DataLoader workers (which is stricter than per-worker
splitting, where the order changes with `num_workers`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from prep.loaders.base import counter_rng

_WINDOW_CACHE = 4  # a batch touches at most two windows; a few more cover prefetching across a boundary
_BLOCK = 4096  # positions of a window resolved to (shard, sample) together
_BLOCK_CACHE = 16  # resolved blocks kept (64 KiB each)
_K = TypeVar("_K")
_V = TypeVar("_V")


def _recently_used(cache: OrderedDict[_K, _V], key: _K, limit: int, make: Callable[[], _V]) -> _V:
    """`cache[key]`, made by `make()` when missing; beyond `limit` entries the least recently used go."""
    got = cache.get(key)
    if got is None:
        got = cache[key] = make()
        while len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return got


def shard_order(n_shards: int, seed: int, path: str, epoch: int, shuffle: bool) -> np.ndarray:
    """The shard visiting order of an epoch (identity when not shuffling)."""
    if not shuffle:
        return np.arange(n_shards, dtype=np.int64)
    return counter_rng(seed, path, "shards", epoch).permutation(n_shards).astype(np.int64)


def window_permutation(size: int, seed: int, path: str, epoch: int, window: int) -> np.ndarray:
    """A seeded bijection of range(size) for one window of one epoch."""
    return counter_rng(seed, path, "window", epoch, window).permutation(size).astype(np.int64)


class EpochOrder:
    """Maps epoch positions to (shard index, sample index within the shard).

    `counts[i]` is the number of samples of shard i. The object caches the current epoch's shard order
    and a few window permutations; it is cheap to rebuild, so it is never part of a saved state.
    """

    def __init__(
        self,
        counts: Sequence[int],
        *,
        seed: int,
        path: str = "",
        shuffle: bool = True,
        window_shards: int = 8,
    ) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed = seed
        self.path = path
        self.shuffle = shuffle
        self.window_shards = max(1, int(window_shards))
        self._epoch: int | None = None
        self._windows: list[np.ndarray] = []  # shard indices of each window
        self._window_starts = np.zeros(1, dtype=np.int64)  # epoch position where each window starts (+ end)
        self._within: list[np.ndarray] = []  # cumulative sample counts inside each window (leading 0)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        order = shard_order(len(self.counts), self.seed, self.path, epoch, self.shuffle)
        m = self.window_shards
        self._windows = [order[i : i + m] for i in range(0, len(order), m)]
        sizes = np.array([self.counts[w].sum() for w in self._windows], dtype=np.int64)
        self._window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._within = [
            np.concatenate([[0], np.cumsum(self.counts[w])]).astype(np.int64) for w in self._windows
        ]
        self._epoch = epoch

    def _perm(self, epoch: int, w: int) -> np.ndarray:
        def make() -> np.ndarray:
            size = int(self._window_starts[w + 1] - self._window_starts[w])
            return window_permutation(size, self.seed, self.path, epoch, w)

        return _recently_used(self._perms, (epoch, w), _WINDOW_CACHE, make)

    def _block(self, epoch: int, w: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, sample indices) of positions [b * _BLOCK, (b + 1) * _BLOCK) of window w: the
        window's permutation resolved a block at a time (computing a whole window up front would delay
        a first batch), so a batch's lookup is mostly two slices. It runs in each worker per batch."""

        def make() -> tuple[np.ndarray, np.ndarray]:
            size = int(self._window_starts[w + 1] - self._window_starts[w])
            lo, hi = b * _BLOCK, min(size, (b + 1) * _BLOCK)
            local = self._perm(epoch, w)[lo:hi] if self.shuffle else np.arange(lo, hi, dtype=np.int64)
            within = self._within[w]
            j = np.searchsorted(within, local, side="right") - 1
            return self._windows[w][j], local - within[j]

        return _recently_used(self._blocks, (epoch, w, b), _BLOCK_CACHE, make)

    def lookup(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, sample indices) of epoch positions [start, stop), sliced from resolved blocks."""
        if not 0 <= start <= stop <= self.total:
            raise IndexError(f"positions [{start}, {stop}) outside an epoch of {self.total} samples")
        self._load_epoch(epoch)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        pos = start
        while pos < stop:
            w = int(np.searchsorted(self._window_starts, pos, side="right")) - 1
            w_start = int(self._window_starts[w])
            b, at = divmod(pos - w_start, _BLOCK)
            end = min(stop, int(self._window_starts[w + 1]), pos - at + _BLOCK)
            shards, samples = self._block(epoch, w, b)
            parts.append((shards[at : at + end - pos], samples[at : at + end - pos]))
            pos = end
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def upcoming(self, epoch: int, pos: int, step: int, count: int) -> list[int]:
        """Up to `count` shards in the order a reader of positions pos, pos + step, pos + 2 step, ... (a
        rank's slices of successive global batches) first needs them: every shard of the window of pos
        (its samples are spread over all of them), then of the next window that reader reaches. What a
        cache reads ahead."""
        self._load_epoch(epoch)
        out: dict[int, None] = {}
        while 0 <= pos < self.total and len(out) < count:
            w = int(np.searchsorted(self._window_starts, pos, side="right")) - 1
            out.update((int(s), None) for s in self._windows[w] if self.counts[s])
            w_end = int(self._window_starts[w + 1])
            pos += max(1, -(-(w_end - pos) // step)) * step
        return list(out)[:count]
