"""Loopback HTTP servers for offline tests, benchmarks and the embedded demo.

`serve_images` stands in for the web that img2dataset crawls: generated images of several sizes and
formats, 404s, a corrupt image, a response slower than any sane timeout, a redirect, an image whose
`X-Robots-Tag` forbids AI use, and "flaky" URLs that fail until healed (for `--retry-failed`).
`serve_files` is a static file store (byte ranges, bearer token or signed URLs) with injected latency,
a bandwidth limit and failures that heal (`FileServer.fail`), for remote shard reading, its retries
and the shard cache. `serve_hub` speaks the part of the
HuggingFace hub HTTP API that `huggingface_hub` uses to list and download a dataset repo, so
`HF_ENDPOINT=http://127.0.0.1:PORT` exercises the real client. All record every request (method, path,
headers) so tests can assert what was fetched and which auth was sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import BaseServer
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

# ------------------------------------------------------------------------------------------------ shared


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased

    @classmethod
    def of(cls, method: str, path: str, handler: BaseHTTPRequestHandler) -> Request:
        return cls(method, path, {k.lower(): v for k, v in handler.headers.items()})


@dataclass
class _Log:
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, req: Request) -> None:
        with self.lock:
            self.requests.append(req)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.open_connections: set[Any] = set()  # kept-alive clients, closed when the server stops
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every kept-alive connection, as a stopped server's host would (its clients must reconnect)."""
        import socket

        with self.connections_lock:
            for conn in self.open_connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (its timeout fired) is expected here, not an error worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: object  # set on the subclass

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, *,
              head: bool = False) -> None:
        self.send_response(code)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)



def free_port() -> int:
    """A loopback port nothing listens on now (for a server, a rendezvous, or a refused connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_url(server: BaseServer) -> str:
    """http://HOST:PORT of a listening loopback server."""
    host, port = cast(tuple[str, int], server.server_address)[:2]
    return f"http://{host}:{port}"

@contextmanager
def _serving(handler_cls: type[_Handler], port: int = 0) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", port), handler_cls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------ images


def make_image(width: int, height: int, fmt: str = "jpeg", seed: int = 0) -> bytes:
    """A deterministic test image: a colour gradient that depends on `seed` (so images differ)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(width - 1, 1) + seed * 37) % 256
    g = (y * 255 // max(height - 1, 1) + seed * 91) % 256
    b = ((x + y) * 7 + seed * 13) % 256
    arr = np.stack([r, g, b], axis=-1).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


CORRUPT_IMAGE = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"this is not image data" * 20

_IMG_RE = re.compile(r"^/img/(\d+)x(\d+)(?:-(\d+))?\.(jpg|png)$")


@dataclass
class ImageServer:
    """What `serve_images` yields: the base URL, the request log and switches for the flaky URLs."""

    url: str
    slow_seconds: float
    log: _Log
    healed: threading.Event
    stopping: threading.Event

    @property
    def requests(self) -> list[Request]:
        with self.log.lock:
            return list(self.log.requests)

    def hits(self) -> Counter[str]:
        """How many times each path was requested."""
        return Counter(r.path for r in self.requests)

    def heal(self) -> None:
        """From now on the /flaky/ URLs serve their image."""
        self.healed.set()

    # URL builders, so tests and the demo never spell paths by hand
    def good(self, width: int, height: int, seed: int = 0, fmt: str = "jpg") -> str:
        return f"{self.url}/img/{width}x{height}-{seed}.{fmt}"

    def missing(self, i: int) -> str:
        return f"{self.url}/missing/{i}.jpg"

    def corrupt(self, i: int) -> str:
        return f"{self.url}/corrupt/{i}.jpg"

    def slow(self, i: int) -> str:
        return f"{self.url}/slow/{i}.jpg"

    def redirect(self, width: int, height: int, seed: int = 0) -> str:
        return f"{self.url}/redirect/img/{width}x{height}-{seed}.jpg"

    def noai(self, i: int) -> str:
        return f"{self.url}/noai/{i}.jpg"

    def flaky(self, i: int) -> str:
        return f"{self.url}/flaky/{i}.jpg"

    def failing(self, status: int, i: int) -> str:
        return f"{self.url}/failing/{status}/{i}.jpg"

    def reset(self, i: int) -> str:
        return f"{self.url}/reset/{i}.jpg"


@contextmanager
def serve_images(slow_seconds: float = 3.0, port: int = 0) -> Iterator[ImageServer]:
    """Serve generated images on 127.0.0.1 (`port`, or a free one when 0) for as long as the context lasts.

    Paths: `/img/WxH-SEED.jpg|png` (an image), `/missing/N.jpg` (404), `/corrupt/N.jpg` (200, not an
    image), `/slow/N.jpg` (answers after `slow_seconds`, so a shorter client timeout fires),
    `/redirect/<path>` (302 to `<path>`), `/noai/N.jpg` (an image with `X-Robots-Tag: noai`),
    `/flaky/N.jpg` (503 until `heal()`, then an image), `/failing/STATUS/N.jpg` (answers STATUS until
    `heal()`, then an image), `/reset/N.jpg` (resets the connection until `heal()`, then an image).
    """
    log = _Log()
    healed, stopping = threading.Event(), threading.Event()
    cache: dict[tuple[int, int, int, str], bytes] = {}
    cache_lock = threading.Lock()

    def image(w: int, h: int, seed: int, ext: str) -> bytes:
        k = (w, h, seed, ext)
        with cache_lock:
            if k not in cache:
                cache[k] = make_image(w, h, "png" if ext == "png" else "jpeg", seed)
            return cache[k]

    class Handler(_Handler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            log.add(Request.of("GET", path, self))
            m = _IMG_RE.match(path)
            if m:
                w, h, seed, ext = int(m[1]), int(m[2]), int(m[3] or 0), m[4]
                ctype = "image/png" if ext == "png" else "image/jpeg"
                self._send(200, image(w, h, seed, ext), {"Content-Type": ctype})
            elif path.startswith("/missing/"):
                self._send(404, b"not found", {"Content-Type": "text/plain"})
            elif path.startswith("/corrupt/"):
                self._send(200, CORRUPT_IMAGE, {"Content-Type": "image/jpeg"})
            elif path.startswith("/slow/"):
                stopping.wait(slow_seconds)  # ends early when the server stops
                self._send(200, image(64, 64, 0, "jpg"), {"Content-Type": "image/jpeg"})
            elif path.startswith("/redirect/"):
                self._send(302, b"", {"Location": path[len("/redirect"):]})
            elif path.startswith("/noai/"):
                self._send(200, image(64, 48, 1, "jpg"),
                           {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"})
            elif path.startswith(("/flaky/", "/failing/", "/reset/")):
                if healed.is_set():
                    n = int(path.rsplit("/", 1)[-1].split(".")[0])
                    self._send(200, image(80, 60, 100 + n, "jpg"), {"Content-Type": "image/jpeg"})
                elif path.startswith("/reset/"):  # RST instead of an answer: linger on, for 0 seconds
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                else:
                    status = int(path.split("/")[2]) if path.startswith("/failing/") else 503
                    self._send(status, b"try later", {"Content-Type": "text/plain"})
            else:
                self._send(404, b"unknown path", {"Content-Type": "text/plain"})

    with _serving(Handler, port) as server:
        try:
            yield ImageServer(base_url(server), slow_seconds, log, healed, stopping)
        finally:
            stopping.set()


def url_table(rows: list[tuple[str, str]], *, url_col: str = "URL", caption_col: str = "TEXT",
              extra: dict[str, list[object]] | None = None):
    """A pyarrow table of (url, caption) rows in LAION's column names, plus any extra columns."""
    import pyarrow as pa

    cols: dict[str, list[object]] = {url_col: [u for u, _ in rows], caption_col: [c for _, c in rows]}
    cols.update(extra or {})
    return pa.table(cols)


def mixed_rows(srv: ImageServer, *, good: int, missing: int = 0, corrupt: int = 0, slow: int = 0,
               redirect: int = 0, noai: int = 0, flaky: int = 0, tag: str = "") -> list[tuple[str, str]]:
    """(url, caption) rows covering every outcome; good images cycle through sizes and formats."""
    sizes = [(64, 48), (128, 96), (96, 160), (200, 200)]
    rows: list[tuple[str, str]] = []
    for i in range(good):
        w, h = sizes[i % len(sizes)]
        rows.append((srv.good(w, h, i, "png" if i % 5 == 4 else "jpg"), f"{tag}good image {i} {w}x{h}"))
    rows += [(srv.missing(i), f"{tag}missing {i}") for i in range(missing)]
    rows += [(srv.corrupt(i), f"{tag}corrupt {i}") for i in range(corrupt)]
    rows += [(srv.slow(i), f"{tag}slow {i}") for i in range(slow)]
    rows += [(srv.redirect(72, 72, 500 + i), f"{tag}redirect {i}") for i in range(redirect)]
    rows += [(srv.noai(i), f"{tag}noai {i}") for i in range(noai)]
    rows += [(srv.flaky(i), f"{tag}flaky {i}") for i in range(flaky)]
    return rows


# --------------------------------------------------------------------------------------------------- hub


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file: what the hub reports as `oid` for files not stored in LFS."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class HubServer:
    """What `serve_hub` yields: the endpoint URL, the request log and each revision's commit sha."""

    url: str
    repo_id: str
    commits: dict[str, str]
    log: _Log

    @property
    def requests(self) -> list[Request]:
        with self.log.lock:
            return list(self.log.requests)

    def downloads(self) -> list[str]:
        """Paths of files whose bytes were sent (GET on /resolve/), in order."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path]


@contextmanager
def serve_hub(repo_id: str, revisions: dict[str, dict[str, bytes]], *, token: str | None = None,
              lfs_suffixes: tuple[str, ...] = (".parquet",), page_size: int = 50) -> Iterator[HubServer]:
    """Serve a dataset repo the way huggingface.co does, for `HF_ENDPOINT=<url>`.

    `revisions` maps a branch or tag name to the files at that revision. With `token`, the repo is
    private: requests without `Authorization: Bearer <token>` get 401 as on the hub. Files with an
    `lfs_suffixes` ending are reported as LFS (sha256 etag, X-Linked-Size); the tree listing pages
    after `page_size` entries with a `Link: <...>; rel="next"` header.
    """
    log = _Log()
    def commit_sha(rev: str, files: dict[str, bytes]) -> str:
        digest = {p: hashlib.sha256(b).hexdigest() for p, b in sorted(files.items())}
        return hashlib.sha1(json.dumps(digest).encode() + rev.encode()).hexdigest()

    commits = {rev: commit_sha(rev, files) for rev, files in revisions.items()}
    by_commit = {commits[r]: files for r, files in revisions.items()}
    by_rev = {**revisions, **by_commit}

    def lfs(path: str) -> bool:
        return path.endswith(lfs_suffixes)

    def entry(path: str, data: bytes) -> dict[str, object]:
        doc: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if lfs(path):
            doc["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return doc

    def commit_of(rev: str) -> str:
        return commits.get(rev, rev)

    class Handler(_Handler):
        def _authorised(self, head: bool = False) -> bool:
            if token is None or self.headers.get("Authorization") == f"Bearer {token}":
                return True
            body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self._send(401, body, {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound",
                                   "X-Error-Message": "Repository not found"}, head=head)
            return False

        def _not_found(self, what: str, head: bool = False, code: str = "EntryNotFound") -> None:
            body = json.dumps({"error": what}).encode()
            self._send(404, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                   "X-Error-Message": what}, head=head)

        def _json(self, doc: object, headers: dict[str, str] | None = None) -> None:
            self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _route(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            log.add(Request.of("HEAD" if head else "GET", path, self))
            if not self._authorised(head):
                return
            api = f"/api/datasets/{repo_id}"
            if path.startswith(f"{api}/revision/"):
                rev = path[len(f"{api}/revision/"):]
                if rev not in by_rev:
                    return self._not_found(f"Revision Not Found for url: {rev}", head, "RevisionNotFound")
                files = by_rev[rev]
                return self._json({"id": repo_id, "sha": commit_of(rev), "private": token is not None,
                                   "siblings": [{"rfilename": p} for p in sorted(files)]})
            if path.startswith(f"{api}/tree/"):
                rest = path[len(f"{api}/tree/"):]
                rev, _, sub = rest.partition("/")
                if rev not in by_rev:
                    return self._not_found(f"Revision Not Found for url: {rev}", head, "RevisionNotFound")
                query = parse_qs(parts.query)
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                files = by_rev[rev]
                names = sorted(p for p in files if not sub or p.startswith(sub.rstrip("/") + "/"))
                entries: list[dict[str, object]] = []
                folders: set[str] = set()
                base_depth = len(sub.strip("/").split("/")) if sub else 0
                for p in names:
                    segs = p.split("/")
                    if not recursive and len(segs) > base_depth + 1:
                        folders.add("/".join(segs[: base_depth + 1]))
                        continue
                    if recursive:
                        for d in range(base_depth + 1, len(segs)):
                            folders.add("/".join(segs[:d]))
                    entries.append(entry(p, files[p]))
                dirs = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
                entries = dirs + entries
                cursor = int(query.get("cursor", ["0"])[0])
                page = entries[cursor: cursor + page_size]
                headers = {}
                if cursor + page_size < len(entries):
                    nxt = f"{self.server_url}{quote(path)}?recursive={recursive}&cursor={cursor + page_size}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                return self._json(page, headers)
            prefix = f"/datasets/{repo_id}/resolve/"
            if path.startswith(prefix):
                rev, _, fname = path[len(prefix):].partition("/")
                if rev not in by_rev:
                    return self._not_found(f"Revision Not Found for url: {rev}", head, "RevisionNotFound")
                files = by_rev[rev]
                if fname not in files:
                    return self._not_found(f"Entry not found: {fname}", head)
                data = files[fname]
                e = entry(fname, data)
                etag = e["lfs"]["oid"] if lfs(fname) else e["oid"]  # type: ignore[index]
                headers = {"X-Repo-Commit": commit_of(rev), "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if lfs(fname):
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
                rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
                if rng and not head:
                    start = int(rng[1])
                    end = int(rng[2]) if rng[2] else len(data) - 1
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    self.send_response(206)
                    body = data[start: end + 1]
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                    return None
                if head:
                    self.send_response(200)
                    for k, v in {**headers, "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return None
                return self._send(200, data, headers)
            return self._not_found(f"no route for {path}", head, "RepoNotFound")

        @property
        def server_url(self) -> str:
            return base_url(self.server)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    with _serving(Handler) as server:
        yield HubServer(base_url(server), repo_id, commits, log)


# ------------------------------------------------------------------------------------------------ files


class _Link:
    """A shared link of `bandwidth` bytes/s: senders take turns, each chunk waits for the link to be free,
    so the total over all connections stays at the rate (as one network path to a store would)."""

    def __init__(self, bandwidth: float | None) -> None:
        self.bandwidth = bandwidth
        self.free_at = 0.0
        self.lock = threading.Lock()

    def send_file(self, sock: Any, f: Any, start: int, end: int) -> None:
        """Send bytes [start, end) of the open file `f` by `sendfile` (no copy through Python, so the
        server's CPU does not compete with the client it serves), in steps paced to the link."""
        import time

        step = 1 << 18
        pos = start
        while pos < end:
            n = min(step, end - pos)
            if self.bandwidth:
                with self.lock:
                    now = time.monotonic()
                    self.free_at = max(self.free_at, now) + n / self.bandwidth
                    wait = self.free_at - now
                if wait > 0:
                    time.sleep(wait)
            sent = sock.sendfile(f, pos, n)
            if not sent:
                raise ConnectionError("the client closed the connection")
            pos += sent


Fault = int | str  # an HTTP status to answer, or "cut" | "stall" | "reset" (see `FileServer.fail`)


@dataclass
class _Faults:
    """Failures to inject: (pattern, fault, times, retry_after) rules and how often each path met each."""

    rules: list[tuple[str, Fault, int, float | None]] = field(default_factory=list)
    met: Counter[tuple[int, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, path: str) -> tuple[Fault, float | None] | None:
        """The fault for this request of `path` (the first rule that matches and is not used up), if any."""
        import fnmatch

        with self.lock:
            for n, (pattern, fault, times, after) in enumerate(self.rules):
                if fnmatch.fnmatchcase(path, pattern) and self.met[(n, path)] < times:
                    self.met[(n, path)] += 1
                    return fault, after
        return None


@dataclass
class FileServer:
    """What `serve_files` yields: the base URL, the request log and `fail` to inject failures."""

    url: str
    log: _Log
    faults: _Faults = field(default_factory=_Faults)

    @property
    def requests(self) -> list[Request]:
        with self.log.lock:
            return list(self.log.requests)

    def gets(self, suffix: str = "") -> list[Request]:
        """GET requests whose path ends with `suffix`."""
        return [r for r in self.requests if r.method == "GET" and r.path.split("?")[0].endswith(suffix)]

    def fail(self, pattern: str, fault: Fault, times: int = 1, retry_after: float | None = None) -> None:
        """Fail the first `times` GETs of each path matching the glob `pattern` (the path without its
        query, e.g. `/ds/*.tar`), then serve it again, as a store does through a bad minute. `fault`: an
        HTTP status (with `retry_after`, a `Retry-After: <seconds>` header); "cut": the status and
        headers of the whole answer, then half its body, then the connection closes; "stall": no answer
        until the server stops (a client's timeout fires); "reset": the connection is reset at once."""
        with self.faults.lock:
            self.faults.rules.append((pattern, fault, times, retry_after))


def _signature(key: str, path: str) -> str:
    return hashlib.sha256(f"{key}:{path}".encode()).hexdigest()[:32]


def signed_url(url: str, key: str) -> str:
    """`url` with the query a `serve_files(signing_key=key)` store answers: a signature of its path only,
    so the same query at another path (a shard's `.idx`) is refused, as with S3's presigned URLs."""
    return f"{url}?sig={_signature(key, urlsplit(url).path)}"


@contextmanager
def serve_files(root: str | Path, *, token: str | None = None, latency: float = 0.0,
                bandwidth: float | None = None, port: int = 0, ranges: bool = True,
                redirect_to: str | None = None, signing_key: str | None = None) -> Iterator[FileServer]:
    """Serve the files under `root` as a static store does: single byte ranges (206), HEAD, 404 outside
    `root`; with `token`, 401 without `Authorization: Bearer <token>`. `latency` seconds pass before each
    response, and all responses share a link of `bandwidth` bytes/s (None: unlimited), to stand in for
    an object store or the hub at a distance. `ranges=False` is a server that ignores Range and sends
    whole files. With `redirect_to` (another server's URL), an authorised GET of a file is answered with
    a 302 to the same path there, as the hub sends a file request on to its CDN. With `signing_key`, a
    request is answered only at a URL signed for its own path (`signed_url`), as an object store answers
    presigned URLs: 403 for any other. `FileServer.fail` makes chosen paths fail their first requests (a
    status, a cut body, a stall, a reset) before serving them again."""
    base = Path(root).resolve()
    log = _Log()
    link = _Link(bandwidth)
    faults = _Faults()
    stopping = threading.Event()

    class Handler(_Handler):
        disable_nagle_algorithm = True  # headers and body go out at once (no delayed-ACK wait per request)

        def _serve(self, head: bool) -> None:
            import time

            log.add(Request.of(self.command, self.path, self))
            if latency:
                time.sleep(latency)
            fault = None if head else faults.take(unquote(urlsplit(self.path).path))
            if fault is not None and fault[0] in ("stall", "reset"):
                if fault[0] == "stall":
                    stopping.wait()
                else:  # RST instead of an answer: linger on, for 0 seconds
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None and isinstance(fault[0], int):
                self._send(fault[0], b"try later",
                           {"Retry-After": f"{fault[1]:g}"} if fault[1] is not None else None)
                return
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                self._send(401, b"unauthorized", head=head)
                return
            parts = urlsplit(self.path)
            if signing_key is not None and parse_qs(parts.query).get("sig") != [_signature(signing_key,
                                                                                          parts.path)]:
                self._send(403, b"signature does not match", head=head)
                return
            path = (base / unquote(parts.path).lstrip("/")).resolve()
            if base not in path.parents or not path.is_file():
                self._send(404, b"not found", head=head)
                return
            if redirect_to is not None and not head:
                self._send(302, b"", {"Location": redirect_to + self.path})
                return
            size = path.stat().st_size
            start, end, code = 0, size, 200
            rng = self.headers.get("Range", "")
            if ranges and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start, end, code = int(a), min(int(b) + 1 if b else size, size), 206
            self.send_response(code)
            self.send_header("Content-Length", str(max(0, end - start)))
            self.send_header("Accept-Ranges", "bytes")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if head or end <= start:
                return
            cut = fault is not None and fault[0] == "cut"
            try:
                with open(path, "rb") as f:
                    link.send_file(self.connection, f, start, start + (end - start) // 2 if cut else end)
            except ConnectionError:
                pass  # the client went away (a killed reader)
            if cut:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def do_GET(self) -> None:
            self._serve(False)

        def do_HEAD(self) -> None:
            self._serve(True)

    with _serving(Handler, port) as server:
        try:
            yield FileServer(base_url(server), log, faults)
        finally:
            stopping.set()
