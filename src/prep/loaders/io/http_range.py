"""Ranged HTTP(S) GETs written straight into a file: the shard cache's download path (and the small GETs of
a manifest or `.idx` beside it, so a cached http(s) dataset never imports fsspec's HTTP stack: 0.2-0.3 s
of every process's start).

Why not fsspec here: its HTTP backend (aiohttp) hands each response over as one `bytes` object built on
an event loop in another thread; for whole-shard downloads that cost 0.30-0.39 CPU-s per 270 MB on the
2-core test VM, against 0.14-0.15 s for `http.client` reading into a reused buffer (the same 2 MiB
ranges, 4 and 16 threads, loopback server; `bench/remote_cache.py`). A DataLoader worker downloads
while it reads, so that CPU comes straight out of its throughput. fsspec stays the path for every other
scheme, for per-sample ranged reads and for any `storage_options` beyond plain headers.

Connections are kept alive per thread (one per host and scheme). Redirects (the hub answers a file
URL with one to its CDN) are followed up to `_MAX_REDIRECTS` times; the Authorization header is sent
only to the host it was given for, never to the place a redirect points at.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

from prep.formats.tar_write import WRITE_PIECE, pwrite_pieces
from prep.loaders.io.retry import retry_after_seconds

_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)  # a closed keep-alive


class FetchError(Exception):
    """The request failed: `status` is the HTTP status of a response other than 206 (or a 200 whose body
    is exactly the range asked for), None when the network failed (refused, reset, timed out, or cut
    before the whole body came); `retry_after` is the server's Retry-After in seconds. Not an OSError,
    so that a failing write to the cache (ENOSPC) is never mistaken for a failing server, nor the other
    way round. Whether it is worth another try is `io/retry`'s call."""

    def __init__(self, status: int | None, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}" if status else reason)
        self.status = status
        self.retry_after = retry_after


def _network(err: Exception, reading: bool) -> FetchError:
    """A network failure, its text led by what `Failure.reason` counts: timeout, connection cut (the
    answer began and stopped) or connection failed (no answer)."""
    kind = "connection cut" if reading else "connection failed"
    if isinstance(err, TimeoutError):
        kind = "timeout"
    return FetchError(None, f"{kind}: {type(err).__name__}: {err}")


def _failed(resp: http.client.HTTPResponse) -> FetchError:
    return FetchError(resp.status, resp.reason, retry_after_seconds(resp.getheader("Retry-After")))


_local = threading.local()
_SSL: ssl.SSLContext | None = None


_Where = tuple[str, str, float]  # (scheme, host, timeout): one kept-alive connection per thread for each


def _connection(where: _Where) -> http.client.HTTPConnection:
    global _SSL
    conns: dict[_Where, http.client.HTTPConnection] = _local.__dict__.setdefault("conns", {})
    conn = conns.get(where)
    if conn is None:
        scheme, netloc, timeout = where
        if scheme == "https":
            _SSL = _SSL or ssl.create_default_context()
            conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=_SSL)
        else:
            conn = http.client.HTTPConnection(netloc, timeout=timeout)
        conns[where] = conn
    return conn


def _drop(where: _Where) -> None:
    conn = _local.__dict__.get("conns", {}).pop(where, None)
    if conn is not None:
        conn.close()


def _buffer() -> memoryview:
    buf = _local.__dict__.get("buf")
    if buf is None:
        buf = _local.buf = memoryview(bytearray(WRITE_PIECE))
    return buf


def get_range_into(url: str, start: int, end: int, headers: Mapping[str, str], out: int,
                   timeout: float) -> int:
    """GET bytes [start, end) of `url` and write them at the same offsets of the file descriptor `out`
    (in pieces of WRITE_PIECE, through one reused buffer); return `end - start`. A body cut short raises
    FetchError(None) (the bytes written are then incomplete: the caller asks again or discards them); a
    200 with more than the range (the server ignored Range) raises FetchError(200). `timeout`: seconds
    the connection may stay silent."""
    resp, where = _get(url, headers, f"bytes={start}-{end - 1}", timeout)
    try:
        if resp.status == 200 and not (start == 0 and resp.length == end - start):
            raise FetchError(200, "the server ignored the Range header")
        if resp.status not in (200, 206):
            raise _failed(resp)
        got = _copy(resp, start, end, out)
        if got < end - start:
            raise FetchError(None, f"connection cut: {got} of {end - start} bytes arrived")
        return got
    except BaseException:
        _drop(where)  # a half-read response leaves the connection unusable
        raise


def get_small(url: str, headers: Mapping[str, str], timeout: float) -> bytes | None:
    """The whole body of a small file (a manifest, an `.idx`); None when the server says 404."""
    resp, where = _get(url, headers, None, timeout)
    try:
        if resp.status == 404:
            resp.read()
            return None
        if resp.status != 200:
            raise _failed(resp)
        return resp.read()
    except (OSError, http.client.HTTPException) as err:  # IncompleteRead: a body cut short
        _drop(where)
        raise _network(err, reading=True) from None
    except BaseException:
        _drop(where)
        raise


def _get(url: str, headers: Mapping[str, str], byte_range: str | None, timeout: float
         ) -> tuple[http.client.HTTPResponse, _Where]:
    """The response to a GET of `url` after redirects, and the connection it came on."""
    sent_headers = dict(headers)
    origin = urlsplit(url)[:2]
    for _ in range(_MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if parts[:2] != origin:
            sent_headers = {k: v for k, v in sent_headers.items() if k.lower() != "authorization"}
        if byte_range is not None:
            sent_headers["Range"] = byte_range
        where = (parts.scheme, parts.netloc, timeout)
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, afresh
            conn = _connection(where)
            try:
                conn.request("GET", path, headers=sent_headers)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as err:
                _drop(where)
                if attempt or not isinstance(err, _STALE):
                    raise _network(err, reading=False) from None
        if resp.status not in _REDIRECTS:
            return resp, where
        location = resp.getheader("Location")
        resp.read()
        if not location:
            raise FetchError(resp.status, "redirect without a Location")
        url = urljoin(url, location)
    raise FetchError(310, f"more than {_MAX_REDIRECTS} redirects")


def _copy(resp: http.client.HTTPResponse, start: int, end: int, out: int) -> int:
    buf = _buffer()
    pos = start
    while pos < end:
        try:
            got = resp.readinto(buf[: min(len(buf), end - pos)])
        except (OSError, http.client.HTTPException) as err:
            raise _network(err, reading=True) from None
        if not got:
            break
        pos += pwrite_pieces(out, buf[:got], pos)
    return pos - start
