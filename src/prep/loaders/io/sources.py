"""Where shards come from, and how a worker reads one sample's bytes from them.

`resolve_shards` turns a source (prep folder, `wdinfo.pkl`, list or brace pattern of tars, remote URLs,
`pipe:` commands) into `ShardSpec`s with their sample counts; that runs once, in the main process.
`ShardReader` runs in each DataLoader worker: it keeps files open and parsed `.idx` offsets cached, so a
sample costs one positioned read locally (a batch's reads are one call of the C helper `read_spans`, the
GIL released), or one ranged request remotely (ranges of a batch are fetched concurrently through
fsspec's `cat_ranges`). With a `ShardCache`, a remote or `pipe:` shard is instead downloaded whole into
the node's cache (a thread reads ahead in the planned order) and read locally; ranged reads remain the
fallback when the cache has no room.

Every remote request runs under one `RetryPolicy` (`io/retry`): transient failures (5xx, 429, timeouts,
cut connections, short bodies) are tried again with backoff; a request's bytes are used only when they
are all there, so a retried read returns what an unfailed one would.

Secrets: an HTTP token travels only in request headers (fsspec `storage_options`), is wrapped so its
repr is `***`, and URLs are redacted (no user info, no query string) in every error message.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import queue
import re
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from prep.errors import PrepError
from prep.formats.index import IDX_SUFFIX, index_path, read_index
from prep.formats.manifest import MANIFEST_NAME, Manifest, read_manifest
from prep.formats.tar import iter_samples, scan_tar, shard_files
from prep.formats.tar_native import NATIVE
from prep.formats.tar_write import pwrite_pieces
from prep.formats.urls import redact_url
from prep.formats.wdinfo import read_wdinfo
from prep.loaders.io.cache import INDEX_SUFFIX, ShardCache, entry_name, release
from prep.loaders.io.http_range import FetchError, get_range_into, get_small
from prep.loaders.io.retry import Attempts, Failure, RetryPolicy, call, classify, gave_up

_OPEN_FILES = 64  # open shard files kept per worker
_OFFSETS_CACHE = 1024  # parsed .idx arrays kept per worker (8 KiB per 1,000 samples)
_CHUNK = 2 << 20  # bytes per ranged request of a whole-shard download
_CHUNKS_AT_ONCE = 4  # requests of one download in flight together (8 MiB of memory at most)
_AHEAD_THREADS = 6  # downloads of the read-ahead in flight per worker (each waits mostly on latency)
_BATCH_THREADS = 8  # requests a batch makes together (index reads, downloads of its missing shards)
_BRACE_RE = re.compile(r"\{[^{}]*\}")
_NATIVE_READ = getattr(NATIVE, "read_spans", None)  # a batch's local reads in one C call, where built
T = TypeVar("T")


class Secret:
    """A string that never shows itself in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):  # travels to workers by pickle (process memory, never a command line)
        return (Secret, (self._value,))


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: `a-{000..009}.tar`, `{a,b}.tar`, nested."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern)) if _BRACE_RE.search(pattern) else [pattern]


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard: where it is read from, its stable name (for the fingerprint), its sample count, its
    sample offsets when they were learnt by scanning (else read lazily from the `.idx`), and its checksum
    and size in bytes when a manifest gives them."""

    url: str
    name: str
    samples: int
    offsets: np.ndarray | None = None
    checksum: str | None = None  # from a manifest: tells a moved copy from another dataset of the same names
    file_bytes: int | None = None  # from a manifest: with the checksum, names a remote shard's cached .idx


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def storage_options_for(url: str, token: Secret | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for a URL: the token goes into an Authorization header (HTTP) or `token` (hf://)."""
    opts = dict(options or {})
    if token is None:
        return opts
    scheme = url.split("://", 1)[0]
    if scheme in ("http", "https"):
        headers = dict(opts.get("headers") or {})
        headers["Authorization"] = f"Bearer {token.reveal()}"
        opts["headers"] = headers
    elif scheme == "hf":
        opts["token"] = token.reveal()
    else:
        raise PrepError(
            f"a token is only used for http(s):// and hf:// sources, not {scheme}://",
            "ShardDataset",
            "pass credentials for this store in storage_options (or its usual environment variables)",
        )
    return opts


# Filesystems by (process, scheme, options): made once per process and kept for good. fsspec's instances
# sit in reference cycles, so the cyclic GC frees them, possibly in a forked worker, where closing one
# waits a whole second for the parent's event loop (which does not run there). Kept, never freed, they
# are never closed in a child; keyed by pid, a child never uses its parent's (nor its connections).
_FILESYSTEMS: dict[tuple[int, str, str], Any] = {}
_FS_LOCK = threading.Lock()


def _fresh_fs_lock() -> None:
    global _FS_LOCK
    _FS_LOCK = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_fresh_fs_lock)


def _filesystem(url: str, token: Secret | None, options: dict[str, Any] | None, timeout: float) -> Any:
    """This process's fsspec filesystem for the URL's scheme and options (see `_FILESYSTEMS`). An http(s)
    one stops waiting on a connection silent for `timeout` seconds (a failure the retries handle), unless
    `storage_options` bring their own `client_kwargs`."""
    import fsspec

    scheme = url.split("://", 1)[0]
    opts = storage_options_for(url, token, options)
    if scheme in ("http", "https") and "client_kwargs" not in opts:
        import aiohttp

        opts["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                  sock_read=timeout)}
    key = (os.getpid(), scheme, json.dumps(opts, sort_keys=True, default=repr))  # held in memory only
    try:
        with _FS_LOCK:
            fs = _FILESYSTEMS.get(key)
            if fs is None:
                fs = _FILESYSTEMS[key] = fsspec.filesystem(scheme, skip_instance_cache=True, **opts)
        return fs
    except (ImportError, ValueError) as err:
        raise PrepError(
            f"no fsspec filesystem for {scheme}:// ({type(err).__name__}: {err})",
            redact_url(url),
            f"install the fsspec backend for {scheme}:// (s3fs for s3://, gcsfs for gs://)",
        ) from None


def unreadable(err: OSError, what: str, where: str) -> PrepError:
    """A local file that is there but cannot be read (no permission, a directory in its place, a failing
    disk): an I/O error, raised, never a bad sample."""
    return PrepError(f"cannot read the {what} ({err.strerror or type(err).__name__})", where,
                     "check that it is a file this user can read")


def _remote_error(err: Exception, url: str, what: str) -> PrepError:
    """The one line for a remote request that failed in a way the retry policy does not know (an
    unexpected exception of a filesystem library): not retried. Its text may hold the URL: only its type
    is shown."""
    failure = classify(err) or Failure(None, type(err).__name__, False)
    return gave_up(failure, redact_url(url), what, 1, 0.0)


def _remote(fn: Callable[[], T], url: str, what: str, retry: RetryPolicy) -> T:
    """`fn()` (a remote request) under the retry policy; any failure ends as the one-line PrepError."""
    try:
        return call(fn, retry, redact_url(url), what)
    except PrepError:
        raise
    except Exception as err:  # fsspec backends raise their own types (aiohttp, botocore, hf)
        raise _remote_error(err, url, what) from None


def _exact(blob: bytes, start: int, end: int) -> bytes:
    """The body of a ranged request when it is the whole range; a shorter one is a cut connection (worth
    another try), a longer one a server that ignored Range (not)."""
    if len(blob) < end - start:
        raise FetchError(None, f"connection cut: {len(blob)} of {end - start} bytes arrived")
    if len(blob) > end - start:
        raise FetchError(200, f"the server ignored the Range header (sent {len(blob)} bytes for "
                              f"{end - start})")
    return blob


def _scan_stream(f: Any, where: str) -> np.ndarray:
    """Sample offsets (N+1) of a tar read front to back (remote without `.idx`, or `pipe:`)."""
    samples = list(iter_samples(f, where, seekable=False))
    if not samples:
        return np.zeros(1, dtype=np.uint64)
    return np.array([s.offset for s in samples] + [samples[-1].end], dtype=np.uint64)


def _pipe_bytes(url: str) -> bytes:
    cmd = url[len("pipe:") :]
    proc = subprocess.run(cmd, shell=True, capture_output=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise PrepError(
            f"pipe command exited with {proc.returncode}: {tail[0][:200]}",
            redact_url(url),
            "run the command by hand to see why it fails",
        )
    return proc.stdout


# ------------------------------------------------------------------------------------------ resolving
def _folder_shards(folder: Path) -> list[ShardSpec]:
    """A prep folder: manifest.json when present, else every `*.tar` with its `.idx` (or a header scan)."""
    if (folder / MANIFEST_NAME).exists():
        m = read_manifest(folder)
        return [ShardSpec(str(folder / s.path), s.path, s.samples, checksum=s.checksum, file_bytes=s.bytes)
                for s in m.shards]
    tars = sorted(shard_files(folder))  # by path parts, the order this loader has always used
    if not tars:
        raise PrepError(
            "no manifest.json and no .tar files in this folder",
            str(folder),
            "point the loader at a shard folder, or run `prep run generate_wdinfo` on it",
        )
    return [_local_tar(p, p.relative_to(folder).as_posix()) for p in tars]


def _local_tar(path: Path, name: str) -> ShardSpec:
    if not path.is_file():
        raise PrepError("shard not found", str(path), "check the path or pattern")
    if index_path(path).exists():
        return ShardSpec(str(path), name, len(read_index(path)) - 1)
    offsets = _scanned_offsets(path)
    return ShardSpec(str(path), name, len(offsets) - 1, offsets)


def _scanned_offsets(path: str | os.PathLike[str]) -> np.ndarray:
    """Sample offsets (N+1) of a local tar without `.idx`, from a header scan; the last value is where
    the last sample ends."""
    scan = scan_tar(path)
    return np.array(
        [s.offset for s in scan.samples] + ([scan.samples[-1].end] if scan.samples else [0]),
        dtype=np.uint64,
    )


def _remote_tar(url: str, token: Secret | None, options: dict[str, Any] | None,
                retry: RetryPolicy) -> ShardSpec:
    offsets = _remote_offsets(url, token, options, retry)
    return ShardSpec(url, redact_url(url), len(offsets) - 1, offsets)


def _remote_offsets(url: str, token: Secret | None, options: dict[str, Any] | None, retry: RetryPolicy,
                    fetch_index: Callable[[], bytes | None] | None = None) -> np.ndarray:
    """Sample offsets (N+1) of a remote tar: from its `.idx` when there is one (got by `fetch_index`, e.g.
    through the shard cache, else requested), else from a header scan (begun again when it fails)."""
    raw = fetch_index() if fetch_index is not None else _remote_index(url, token, options, retry)
    if raw is not None:
        return _index_array(raw, url)
    fs = _filesystem(url, token, options, retry.timeout)
    name = redact_url(url)

    def scan() -> np.ndarray:
        with fs.open(url, "rb", block_size=1 << 22) as f:
            return _scan_stream(f, name)

    return _remote(scan, url, "read the shard", retry)


def is_tar_url(url: str) -> bool:
    """Whether a remote item names one tar (its path ends in `.tar`, whatever its query says, as a
    presigned URL's does) rather than a folder with a manifest.json."""
    return urlsplit(url).path.endswith(".tar")


def _beside(url: str, suffix: str) -> str:
    """The URL of the file named `suffix` longer than `url`'s (`a.tar?sig=x` -> `a.tar.idx?sig=x`): the
    suffix goes on the path, the query stays the query."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + suffix)) if parts.query else url + suffix


def _index_array(raw: bytes, url: str) -> np.ndarray:
    if len(raw) % 8 or len(raw) < 8:
        raise PrepError(
            f"index has {len(raw)} bytes, not a multiple of 8",
            redact_url(_beside(url, IDX_SUFFIX)),
            "rebuild it with `prep run generate_wdinfo`",
        )
    return np.frombuffer(raw, dtype="<u8").copy()


def _plain_http(url: str, token: Secret | None, options: dict[str, Any] | None) -> dict[str, str] | None:
    """The request headers when `url` is http(s) and its options are headers only (then `io/http_range`
    fetches it: less CPU, no fsspec import); None when fsspec must (other schemes or options)."""
    opts = storage_options_for(url, token, options)
    if url.startswith(("http://", "https://")) and set(opts) <= {"headers"}:
        return dict(opts.get("headers") or {})
    return None


def _get_small(url: str, token: Secret | None, options: dict[str, Any] | None, what: str,
               retry: RetryPolicy, absent: tuple[int, ...] = (404,)) -> bytes | None:
    """A small remote file's bytes (None when the server answers a status in `absent`: it does not exist),
    by http_range when the URL allows."""
    headers = _plain_http(url, token, options)

    def fetch() -> bytes | None:
        try:
            if headers is not None:
                return get_small(url, headers, retry.timeout)
            return bytes(_filesystem(url, token, options, retry.timeout).cat_file(url))
        except Exception as err:
            failure = classify(err)
            if failure is not None and failure.status in absent:
                return None
            raise

    return _remote(fetch, url, what, retry)


def _remote_index(url: str, token: Secret | None, options: dict[str, Any] | None,
                  retry: RetryPolicy) -> bytes | None:
    """The bytes of a remote tar's `.idx`, None when it has none. A URL with a query (a presigned URL,
    whose signature covers the tar's path only) may be refused at the `.idx`: then it has none here."""
    absent = (401, 403, 404) if urlsplit(url).query else (404,)
    return _get_small(_beside(url, IDX_SUFFIX), token, options, "read the index", retry, absent)


def _remote_folder(url: str, token: Secret | None, options: dict[str, Any] | None,
                   retry: RetryPolicy) -> list[ShardSpec]:
    base = url.rstrip("/") + "/"
    raw = _get_small(base + MANIFEST_NAME, token, options, "read the remote manifest.json", retry)
    if raw is None:
        raise PrepError("cannot read the remote manifest.json (HTTP 404)", redact_url(base + MANIFEST_NAME),
                        "check the URL: a remote folder needs the manifest.json that generate_wdinfo writes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PrepError("the remote manifest.json is not UTF-8 text", redact_url(base + MANIFEST_NAME),
                        "check the URL: a remote folder's manifest.json is the one generate_wdinfo writes; "
                        "a tar URL's path ends in .tar") from None
    m = Manifest.from_json(text, redact_url(base + MANIFEST_NAME))
    return [ShardSpec(base + s.path, s.path, s.samples, checksum=s.checksum, file_bytes=s.bytes)
            for s in m.shards]


def _pipe_tar(url: str) -> ShardSpec:
    offsets = _scan_stream(io.BytesIO(_pipe_bytes(url)), redact_url(url))
    return ShardSpec(url, url, len(offsets) - 1, offsets)


def source_items(source: Any) -> list[str]:
    """A source (a path, URL or pattern, or a list of them) as the list of items it names, braces expanded."""
    items: list[str] = []
    if isinstance(source, str | os.PathLike):
        items = expand_braces(os.fspath(source))
    elif isinstance(source, Sequence) and source:
        for s in source:
            items += expand_braces(os.fspath(s))
    if not items:
        raise PrepError(
            "the source names no shards",
            "ShardDataset(source=...)",
            "pass a shard folder, a tar pattern such as data-{000..009}.tar, or a list of URLs",
        )
    return items


def hub_urls(items: list[str], token: Secret | None) -> tuple[list[str], Secret | None]:
    """`hf://` items as the hub's https URLs (`prep.hub.resolve_url`), and the token to send: the one
    given, else HF_TOKEN, but only when every remote item is on the hub (HF_TOKEN must reach no other
    host)."""
    from prep.hub import resolve_token, resolve_url

    remote = [i for i in items if is_remote(i)]
    if token is None and all(i.startswith("hf://") for i in remote):
        env = resolve_token(None)
        token = Secret(env) if env else None
    return [resolve_url(i) if i.startswith("hf://") else i for i in items], token


def resolve_shards(
    source: Any,
    *,
    allow_pipe: bool = False,
    token: Secret | None = None,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> list[ShardSpec]:
    """The shards of a source, in their canonical order, with sample counts.

    - a folder: its manifest.json, else its `*.tar` files (sorted) counted from `.idx` or headers;
    - a path to `wdinfo.pkl`: read (safely) only because it was named; its tars sit beside it;
    - a tar path, brace pattern or list of them; `https://`, `hf://`, `s3://`... through fsspec or, for
      plain http(s), `io/http_range` (a URL whose path does not end in `.tar` is a remote folder with a
      manifest.json;
      `ShardDataset` turns `hf://` paths into the hub's https URLs first, see `hub_urls`);
    - `pipe:CMD` only with `allow_pipe=True` (the command's output is read whole per shard).

    Remote requests are retried under `retry`.
    """
    items = source_items(source)
    specs: list[ShardSpec] = []
    for item in items:
        if item.startswith("pipe:"):
            if not allow_pipe:
                raise PrepError(
                    "pipe: sources run shell commands and are off by default",
                    redact_url(item),
                    "pass allow_pipe=True if you trust this command",
                )
            specs.append(_pipe_tar(item))
        elif is_remote(item):
            specs += (
                [_remote_tar(item, token, storage_options, retry)]
                if is_tar_url(item)
                else _remote_folder(item, token, storage_options, retry)
            )
        else:
            p = Path(_local(item))
            if p.is_dir():
                specs += _folder_shards(p)
            elif p.name.endswith(".pkl"):
                info = read_wdinfo(p)
                specs += [_local_tar(p.parent / t, t) for t in info["tar_files"]]
            else:
                specs.append(_local_tar(p, item))  # named as given: two dirs may hold the same basename
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PrepError(
            f"shard {dup!r} is listed twice",
            "ShardDataset(source=...)",
            "list each shard once (a shard listed twice would be read twice per epoch)",
        )
    return specs


# ------------------------------------------------------------------------------------------ reading
def _preadv_each(buf: np.ndarray, fds: list[int], plan: list[tuple[int, int, int, int]],
                 dst: list[int]) -> tuple[int, int]:
    """The Python twin of the C batch read (`read_spans`): a preadv per sample. (k, the byte where its
    shard ends) for the first sample k that its shard ends before, else (-1, 0)."""
    mv = buf.data
    for k, (fd, (_, _, start, end), a) in enumerate(zip(fds, plan, dst, strict=True)):
        got = os.preadv(fd, [mv[a : a + end - start]], start)
        if got != end - start:
            return k, start + got
    return -1, 0


class ShardReader:
    """Per-process reader of sample bytes. Holds open files and offsets; never pickles them (a worker
    builds its own after fork or spawn)."""

    def __init__(
        self,
        shards: Sequence[ShardSpec],
        *,
        token: Secret | None = None,
        storage_options: dict[str, Any] | None = None,
        pipe_cache: int = 2,
        cache: ShardCache | None = None,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.shards = list(shards)
        self.token = token
        self.storage_options = storage_options
        self.pipe_cache = max(1, pipe_cache)
        self.cache = cache
        self.retry = retry
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pipes: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # offsets and filesystems are shared with the read-ahead thread
        self._ahead: queue.SimpleQueue[int] | None = None
        self._queued: OrderedDict[int, None] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None  # this process's concurrent requests for a batch
        self._chunks: ThreadPoolExecutor | None = None  # and the chunk requests of its downloads
        self._entries: dict[int, tuple[str, int]] = {}  # cache entry (name, size) per shard
        self._ahead_failed: dict[int, PrepError] = {}  # downloads the read-ahead gave up on, per shard

    def __getstate__(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "token": self.token,
            "storage_options": self.storage_options,
            "pipe_cache": self.pipe_cache,
            "cache": self.cache,
            "retry": self.retry,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def offsets(self, i: int) -> np.ndarray:
        with self._lock:
            cached = self._offsets.get(i)
        if cached is not None:
            return cached
        spec = self.shards[i]
        off: np.ndarray
        if spec.offsets is not None:
            off = spec.offsets
        elif is_remote(spec.url):
            off = _remote_offsets(spec.url, self.token, self.storage_options, self.retry,
                                  self._cached_index(i) if self.cached(i) else None)
        else:
            path = _local(spec.url)
            try:
                off = read_index(path) if index_path(path).exists() else _scanned_offsets(path)
            except OSError as err:
                raise unreadable(err, "shard or its .idx", spec.url) from None
        if len(off) - 1 != spec.samples:
            raise PrepError(
                f"shard has {len(off) - 1} samples but the source listed {spec.samples}",
                redact_url(spec.url),
                "regenerate manifest.json and .idx with `prep run generate_wdinfo`",
            )
        with self._lock:
            self._offsets[i] = off
            while len(self._offsets) > _OFFSETS_CACHE:
                self._offsets.popitem(last=False)
        return off

    # ------------------------------------------------------------------------------------ caching
    def _cached_index(self, i: int) -> Callable[[], bytes | None]:
        """How to get a remote shard's `.idx` through the cache: fetched once per node (not once per
        worker and epoch) and kept as a small entry; None when the shard has none (a header scan)."""
        assert self.cache is not None
        cache, spec = self.cache, self.shards[i]
        name = entry_name(redact_url(spec.url), spec.file_bytes or -1, f"{spec.checksum}:{spec.samples}",
                          INDEX_SUFFIX)
        token, options, retry = self.token, self.storage_options, self.retry
        return lambda: cache.fetch_small(name, lambda: _remote_index(spec.url, token, options, retry))

    def cached(self, i: int) -> bool:
        """Whether shard i is read through the cache (remote and `pipe:` shards, when there is one)."""
        url = self.shards[i].url
        return self.cache is not None and (is_remote(url) or url.startswith("pipe:"))

    def _entry(self, i: int) -> tuple[str, int]:
        """(cache entry name, size): the shard's bytes up to the end of its last sample."""
        got = self._entries.get(i)
        if got is None:
            spec = self.shards[i]
            identity = spec.url if spec.url.startswith("pipe:") else redact_url(spec.url)  # hashed only
            size = int(self.offsets(i)[-1])
            got = self._entries[i] = (entry_name(identity, size, spec.checksum), size)
        return got

    def _cache_fd(self, i: int, wait: bool = True) -> int | None:
        """A descriptor of shard i's cache entry (downloaded now when absent), or None: no room (or, with
        `wait=False`, another process is downloading it)."""
        assert self.cache is not None
        if wait:  # the read-ahead already tried (and retried) it: its verdict, not a second round of tries
            with self._lock:
                failed = self._ahead_failed.pop(i, None)
            if failed is not None:
                raise failed
        name, size = self._entry(i)
        url = self.shards[i].url
        try:
            return self.cache.fill(name, size, lambda fd: self._download(i, size, fd), wait=wait)
        except PrepError:
            raise
        except OSError as err:
            raise PrepError(f"cannot write the shard cache ({err.strerror or err})", str(self.cache.folder),
                            "free disk space or pass another cache_dir") from None
        except Exception as err:
            raise _remote_error(err, url, "download the shard") from None

    def _download(self, i: int, size: int, out: int) -> int:
        """Write shard i's first `size` bytes to the descriptor `out`; return how many were written. A
        remote shard comes in ranged chunks, `_CHUNKS_AT_ONCE` in flight on a sliding window (a new request
        starts as soon as one ends, so the link never idles for a group's slowest request); a `pipe:`
        command's output is written as it streams (never held whole in memory)."""
        url = self.shards[i].url
        if url.startswith("pipe:"):
            written = 0
            with subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL) as proc:
                assert proc.stdout is not None
                while chunk := proc.stdout.read(1 << 20):
                    if written < size:
                        written += pwrite_pieces(out, chunk[: size - written], written)
            if proc.returncode != 0:
                raise PrepError(f"pipe command exited with {proc.returncode}", redact_url(url),
                                "run the command by hand to see why it fails")
            return written
        headers = _plain_http(url, self.token, self.storage_options)
        fs = None if headers is not None else self._filesystem(url)
        retry, where = self.retry, redact_url(url)

        def get(a: int) -> int:
            """One chunk, asked for again while it fails transiently; a retry writes the same bytes at the
            same offsets, and the entry appears only when every chunk came whole (`ShardCache.fill`)."""
            e = min(size, a + _CHUNK)
            if fs is None:  # see io/http_range.py: the same request with less CPU
                return call(lambda: get_range_into(url, a, e, headers or {}, out, retry.timeout), retry,
                            where, "download the shard")
            blob = call(lambda: _exact(fs.cat_file(url, start=a, end=e), a, e), retry, where,
                        "download the shard")
            return pwrite_pieces(out, blob, a)

        pool = self._chunk_pool()
        starts = iter(range(0, size, _CHUNK))
        running = {pool.submit(get, a) for a in itertools.islice(starts, _CHUNKS_AT_ONCE)}
        written = 0
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    written += fut.result()
                    running |= {pool.submit(get, a) for a in itertools.islice(starts, 1)}
        finally:
            for fut in running:
                fut.cancel()
            wait(running)
        return written

    def _chunk_pool(self) -> ThreadPoolExecutor:
        """This process's threads for the chunk requests of its downloads."""
        with self._lock:
            if self._chunks is None:
                self._chunks = ThreadPoolExecutor((_AHEAD_THREADS + _BATCH_THREADS) * _CHUNKS_AT_ONCE,
                                                  thread_name_prefix="prep-chunk")
            return self._chunks

    def prefetch(self, shards: Sequence[int]) -> None:
        """Queue shards for the read-ahead threads (in the order given: the order they will be read), as
        many as fill half the cache at most: read-ahead beyond that would evict the shards being read."""
        if self._pid != os.getpid():
            self._reset()
        assert self.cache is not None
        ahead: list[int] = []
        room = self.cache.max_bytes // 2
        for i in shards:
            spec = self.shards[i]
            size = spec.file_bytes or (int(spec.offsets[-1]) if spec.offsets is not None else 0)
            if ahead and size > room:
                break
            ahead.append(i)
            room -= size
        wanted = [i for i in ahead if self.cached(i) and i not in self._queued]
        if not wanted:
            return
        if self._ahead is None:
            self._ahead = queue.SimpleQueue()
            for _ in range(_AHEAD_THREADS):
                threading.Thread(target=self._read_ahead, args=(self._ahead,), daemon=True,
                                 name="prep-read-ahead").start()
        for i in wanted:
            self._queued[i] = None
            self._ahead.put(i)
        while len(self._queued) > 4 * len(wanted) + 64:  # forgotten, so a later epoch queues it again
            self._queued.popitem(last=False)

    def _at_once(self, fn: Callable[[int], Any], shards: list[int]) -> list[Any]:
        """fn over the shards, in threads when there are several (each is a request or a download); the
        first error is raised after all have ended, so no result (an open descriptor) is lost."""
        if len(shards) <= 1:
            return [fn(i) for i in shards]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_BATCH_THREADS, thread_name_prefix="prep-read")
        futures = [self._pool.submit(fn, i) for i in shards]
        wait(futures)
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                if f.exception() is None and isinstance(f.result(), int):
                    release(f.result())
            raise failed
        return [f.result() for f in futures]

    def _read_ahead(self, todo: queue.SimpleQueue[int]) -> None:
        while True:
            i = todo.get()
            try:
                fd = self._cache_fd(i, wait=False)  # another worker downloading it: on to the next one
            except PrepError as err:  # the reading path raises it when it needs the shard
                with self._lock:
                    self._ahead_failed[i] = err
                continue
            except Exception:  # the reading path meets the same error and reports it
                continue
            with self._lock:
                self._ahead_failed.pop(i, None)
            if fd is not None:
                release(fd)

    def _filesystem(self, url: str) -> Any:
        """This process's filesystem for the URL, shared by its threads (fsspec runs every request of it
        on one event loop)."""
        return _filesystem(url, self.token, self.storage_options, self.retry.timeout)

    def _fd(self, i: int) -> int:
        """Shard i's descriptor, opened once and kept (least recently used first). Closing the oldest
        beyond `_OPEN_FILES` is left to `_close_oldest`, after the batch that asked: a batch may span more
        shards than that, and its descriptors must all stay open until it is read."""
        fd = self._fds.get(i)
        if fd is None:
            try:
                fd = os.open(_local(self.shards[i].url), os.O_RDONLY)
            except FileNotFoundError:
                raise PrepError(
                    "shard not found", self.shards[i].url, "check that the dataset is complete"
                ) from None
            except OSError as err:
                raise unreadable(err, "shard", self.shards[i].url) from None
            self._fds[i] = fd
        else:
            self._fds.move_to_end(i)
        return fd

    def _close_oldest(self) -> None:
        while len(self._fds) > _OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])

    def _pipe(self, i: int) -> bytes:
        data = self._pipes.get(i)
        if data is None:
            data = self._pipes[i] = _pipe_bytes(self.shards[i].url)
            while len(self._pipes) > self.pipe_cache:
                self._pipes.popitem(last=False)
        return data

    def read_into(
        self, refs: Sequence[tuple[int, int]], alloc: Callable[[int], np.ndarray]
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Read each (shard, sample)'s bytes (first header to the end of its last member) back to back into
        one buffer from `alloc(total)`; return it and each sample's (start, end) in it. Local shards are
        read straight into the buffer (`_read_local`: the batch in one call), so the bytes are copied
        once, by the kernel."""
        if self._pid != os.getpid():  # forked after files were opened: never share descriptors
            self._reset()
        got = self._read_open(refs, alloc)
        if got is not None:
            return got
        distinct = list(dict.fromkeys(i for i, _ in refs))
        # remote .idx reads, concurrently (a local one is a short file read: threads only add their start)
        unread = [i for i in distinct if i not in self._offsets and is_remote(self.shards[i].url)]
        self._at_once(self.offsets, unread)
        offsets = {i: self.offsets(i) for i in distinct}
        plan: list[tuple[int, int, int, int]] = []
        spans: list[tuple[int, int]] = []
        total = 0
        for i, j in refs:
            off = offsets[i]
            start, end = int(off[j]), int(off[j + 1])
            plan.append((i, j, start, end))
            spans.append((total, total + end - start))
            total += end - start
        buf = alloc(total)
        mv = buf.data
        remote: list[tuple[int, int, int, int]] = []
        on_disk = {i for i in distinct if not self.shards[i].url.startswith("pipe:") and not is_remote(
            self.shards[i].url)}
        local = [k for k, (i, _, _, _) in enumerate(plan) if i in on_disk]  # read below, in one call
        # cache entries read by this batch (shared-locked until done), missing ones downloaded together
        held: dict[int, int | None] = {}
        if self.cache is not None:
            for i in distinct:  # entries already there: opened here, no thread hop
                if self.cached(i):
                    held[i] = self.cache.open(self._entry(i)[0])
            missing = [i for i, fd in held.items() if fd is None]
            held.update(zip(missing, self._at_once(self._cache_fd, missing), strict=True))
        try:
            for k, ((i, _, start, end), (a, b)) in enumerate(zip(plan, spans, strict=True)):
                if i in on_disk:
                    continue
                if held.get(i) is not None:  # a complete cache entry: read with the on-disk samples
                    local.append(k)
                elif self.shards[i].url.startswith("pipe:"):
                    mv[a:b] = self._pipe(i)[start:end]
                else:
                    remote.append((k, i, start, end))
            if local:
                fd_of = {i: fd for i, fd in held.items() if fd is not None}
                fd_of.update((i, self._fd(i)) for i in on_disk)
                local.sort()
                self._read_local([plan[k] for k in local], [spans[k][0] for k in local], buf, fd_of)
        finally:
            for fd in held.values():
                if fd is not None:
                    release(fd)
            self._close_oldest()
        if remote:
            blobs: list[bytes | None] = [None] * len(plan)
            self._read_remote(remote, blobs)
            for k, _, _, _ in remote:
                a, b = spans[k]
                mv[a:b] = blobs[k]  # type: ignore[assignment]
        return buf, spans

    def _read_open(
        self, refs: Sequence[tuple[int, int]], alloc: Callable[[int], np.ndarray]
    ) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
        """`read_into` for the steady state: every shard of the batch a file on disk that this process
        has open, its offsets loaded. One pass over the samples and one C read, without the general
        path's per-shard steps (kind, cache, descriptor lookups), whose Python runs cold between the
        decodes (design-notes.md, "Loader speed"). None for anything else, which the general path
        reads (and opens, loads, downloads), and where the C read was not built."""
        read = _NATIVE_READ
        if read is None:
            return None
        offsets, fds = self._offsets, self._fds
        columns: list[list[int]] = [[], [], [], []]  # dst, fds, src, sizes: one int64 array below
        dst, fd_col, src, sizes = columns
        spans: list[tuple[int, int]] = []
        total = 0
        for i, j in refs:
            off, fd = offsets.get(i), fds.get(i)  # only on-disk shards have a descriptor here
            if off is None or fd is None:
                return None
            fds.move_to_end(i)  # least recently used first, as `_fd` keeps them
            start, end = off.item(j), off.item(j + 1)
            dst.append(total)
            fd_col.append(fd)
            src.append(start)
            sizes.append(end - start)
            spans.append((total, total + end - start))
            total += end - start
        buf = alloc(total)
        table = np.array(columns, np.int64)
        try:
            short = read(buf, table[0], table[1], table[2], table[3])
        except OSError as err:
            raise self._read_error(err, [i for i, _ in refs], fd_col, src, sizes) from None
        if short is not None:
            k, _, ended = short
            raise self._truncated(refs[k][0], refs[k][1], ended, src[k] + sizes[k])
        return buf, spans

    def _truncated(self, i: int, j: int, ended: int, end: int) -> PrepError:
        return PrepError(f"shard ends at byte {ended}, sample {j} needs bytes up to {end}",
                         redact_url(self.shards[i].url),
                         "the shard is truncated: re-create it, or rebuild its .idx")

    def _read_error(self, err: OSError, shards: Sequence[int], fds: Sequence[int], starts: Sequence[int],
                    sizes: Sequence[int]) -> PrepError:
        """The one line for a batch read that failed in C, which does not say whose: the first sample
        whose own read fails names its shard (a read error is rare, so reading again costs nothing)."""
        for i, fd, start, size in zip(shards, fds, starts, sizes, strict=True):
            try:
                os.pread(fd, size, start)
            except OSError as own:
                return unreadable(own, "shard", redact_url(self.shards[i].url))
        return unreadable(err, "shard", ", ".join(dict.fromkeys(redact_url(self.shards[i].url)
                                                                 for i in shards)))

    def _read_local(self, plan: list[tuple[int, int, int, int]], dst: list[int], buf: np.ndarray,
                    fd_of: dict[int, int]) -> None:
        """Read samples (shard, sample, start, end) of local files (a shard on disk, a cache entry: their
        descriptors in `fd_of`) into `buf` at `dst`: by the C helper in one call (a preadv per run of
        close samples, the GIL released), else a preadv each. A shard that ends before a sample does
        raises, naming the byte where it ends."""
        fds = [fd_of[i] for i, _, _, _ in plan]
        starts = [s for _, _, s, _ in plan]
        sizes = [e - s for _, _, s, e in plan]
        try:
            if _NATIVE_READ is not None:  # flat int lists: numpy reads them faster than tuples (3.7/6.4 us)
                short = _NATIVE_READ(buf, np.array(dst, np.int64), np.array(fds, np.int64),
                                     np.array(starts, np.int64), np.array(sizes, np.int64))
                k, ended = (-1, 0) if short is None else (short[0], short[2])
            else:
                k, ended = _preadv_each(buf, fds, plan, dst)
        except OSError as err:
            raise self._read_error(err, [i for i, _, _, _ in plan], fds, starts, sizes) from None
        if k >= 0:
            i, j, _, end = plan[k]
            raise self._truncated(i, j, ended, end)

    def _read_remote(self, wanted: list[tuple[int, int, int, int]], out: list[bytes | None]) -> None:
        """Ranged reads of samples (k, shard, start, end) into `out[k]`, a scheme's ranges together (fsspec
        `cat_ranges`). The ranges that failed transiently are asked for again together, after one wait
        of the retry policy per round; a sample's bytes are kept only when its whole range came."""
        by_scheme: dict[str, list[tuple[int, int, int, int]]] = {}
        for w in wanted:
            by_scheme.setdefault(self.shards[w[1]].url.split("://", 1)[0], []).append(w)
        for group in by_scheme.values():
            fs = self._filesystem(self.shards[group[0][1]].url)
            attempts = Attempts(self.retry, "read samples")
            while group:
                urls = [self.shards[i].url for _, i, _, _ in group]
                try:
                    blobs = fs.cat_ranges(urls, [s for *_, s, _ in group], [e for *_, e in group])
                except Exception as err:  # the whole call failed: every range with it
                    blobs = [err] * len(group)
                failed: list[tuple[int, int, int, int]] = []
                worst: tuple[Failure, int] | None = None
                for (k, i, s, e), blob in zip(group, blobs, strict=True):
                    try:
                        if isinstance(blob, Exception):
                            raise blob
                        out[k] = _exact(blob, s, e)
                        continue
                    except PrepError:
                        raise
                    except Exception as err:
                        failure = classify(err)
                        if failure is None:
                            raise _remote_error(err, self.shards[i].url, "read a sample") from None
                    failed.append((k, i, s, e))
                    if worst is None or (worst[0].transient and not failure.transient):
                        worst = (failure, i)  # one that asking again would not mend decides
                if worst is not None:
                    attempts.failed(worst[0], redact_url(self.shards[worst[1]].url), len(failed))
                group = failed
