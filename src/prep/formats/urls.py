"""Facts about URLs that every layer shares, kept light (no torch): how a URL is shown, which HTTP
answers may pass if asked again, and what a failed request's exception says (its status, or how the
network failed). The stages use them without importing the loaders (and torch)."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

_TRANSIENT_STATUS = frozenset({408, 425, 429})  # answers below 500 that ask to come back later
# a URL inside free text (an exception's message): up to a space, a quote or an angle bracket
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str) -> str:
    """A URL without user info or query string (a presigned URL's signature), fit for logs, errors,
    file names and records. Never raises: it runs on error paths, where a malformed URL is common."""
    if url.startswith("pipe:"):
        return "pipe:" + url[5:].split()[0] if url[5:].split() else "pipe:"
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        if parts.port:
            host += f":{parts.port}"
    except ValueError:  # a malformed host or port ("[::1", ":99999"): cut by hand, the host as written
        scheme, _, rest = url.partition("://")
        authority, slash, path = re.split(r"[?#]", rest, maxsplit=1)[0].partition("/")
        return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# query parameters that carry a credential: presigned S3/GCS/CloudFront/Azure SAS links, API keys, tokens
_SECRET_PARAMS = frozenset({"sig", "policy", "key-pair-id", "googleaccessid", "awsaccesskeyid", "auth",
                            "api_key", "apikey", "hdnts", "hmac", "x-goog-credential", "x-amz-credential"})
_SECRET_WORDS = ("signature", "token", "secret", "password", "credential")
REDACTED = "REDACTED"


def _secret_param(name: str) -> bool:
    n = unquote_plus(name).strip().lower()
    return n in _SECRET_PARAMS or any(w in n for w in _SECRET_WORDS)


def scrub_url(url: str) -> str:
    """`url` as a record should keep it (a sample's json, a table): its user info (a password, or a
    token as the user name) and the value of every credential parameter in its query or fragment
    (X-Amz-Signature, sig, token, ...) become REDACTED; everything else stays byte for byte, innocent
    query parameters included (`?width=500` is part of where a LAION image came from). Never raises."""
    if "://" not in url or url.startswith("pipe:"):
        return url
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"

    def params(text: str) -> str:
        out = []
        for item in text.split("&"):
            name, eq, value = item.partition("=")
            out.append(f"{name}={REDACTED}" if eq and value and _secret_param(name) else item)
        return "&".join(out)

    path, hash_, fragment = tail.partition("#")
    path, q, query = path.partition("?")
    return f"{scheme}://{authority}{path}{q}{params(query)}{hash_}{params(fragment)}"


def needs_redacting(url: str) -> bool:
    """Whether `url` holds something redact_url takes out (user info, a query string, a fragment), so a
    record can keep every other URL, and every path, exactly as written."""
    if url.startswith("pipe:") or "://" not in url:
        return redact_url(url) != url
    authority = url.partition("://")[2].partition("/")[0]
    return "@" in authority or "?" in url or "#" in url


def shown_url(src: str) -> str:
    """A path or URL as a record, key, report or message shows it: `redact_url` where it holds user
    info, a query or a fragment (a presigned URL's signature), anything else as written, so plain paths
    and URLs keep their records and keys."""
    return redact_url(src) if needs_redacting(src) else src


def redact_urls_in(text: str) -> str:
    """`text` (an exception's message) with each URL in it shown as `shown_url` shows it: a library's
    error may quote the URL it was given."""
    return _URL_IN_TEXT.sub(lambda m: shown_url(m[0]), text)


# exception classes of the HTTP clients under fsspec and the hub (aiohttp, requests, httpx) that mean the
# network failed, not the server's answer: matched by name, so no client is imported to classify
_CUT_ERRORS = frozenset({"ClientPayloadError", "ChunkedEncodingError", "RemoteProtocolError",
                         "IncompleteRead"})
_NETWORK_ERRORS = frozenset({"ClientConnectionError", "ServerTimeoutError", "ConnectionError", "Timeout",
                             "TimeoutException", "NetworkError"})


def http_status(err: BaseException) -> int | None:
    """The HTTP status a failed request's exception carries (aiohttp's `status`, urllib's `code`,
    requests' and httpx's `response.status_code`), or None."""
    for status in (getattr(err, "status", None), getattr(err, "code", None),
                   getattr(getattr(err, "response", None), "status_code", None)):
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600:
            return status
    return None


def network_failure(err: BaseException) -> str | None:
    """How the network failed, when `err` says it did and no answer came: "timeout", "cut" (a body
    that stopped short) or "connection" (refused, reset, unreachable); None for anything else."""
    names = {c.__name__ for c in type(err).__mro__}
    if isinstance(err, TimeoutError) or "Timeout" in names or "TimeoutException" in names:
        return "timeout"
    if names & _CUT_ERRORS:
        return "cut"
    if isinstance(err, ConnectionError) or names & _NETWORK_ERRORS:
        return "connection"
    return None


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status may be different if asked again: a server error (5xx), a timeout (408),
    too early (425) or too many requests (429)."""
    return status in _TRANSIENT_STATUS or 500 <= status < 600
