"""Facts about URLs that every layer shares, kept light (no torch): how a URL is shown, and which HTTP
answers may pass if asked again. The stages use them without importing the loaders (and torch)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_TRANSIENT_STATUS = frozenset({408, 425, 429})  # answers below 500 that ask to come back later


def redact_url(url: str) -> str:
    """A URL without user info or query string (a presigned URL's signature), fit for logs, errors,
    file names and records."""
    if url.startswith("pipe:"):
        return "pipe:" + url[5:].split()[0] if url[5:].split() else "pipe:"
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status may be different if asked again: a server error (5xx), a timeout (408),
    too early (425) or too many requests (429)."""
    return status in _TRANSIENT_STATUS or 500 <= status < 600
