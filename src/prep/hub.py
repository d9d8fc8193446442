"""HuggingFace hub access for download_parquet: list a dataset repo, fetch files, verify them.

Everything goes through `huggingface_hub` (HfApi.list_repo_tree, hf_hub_download), so HF_ENDPOINT,
proxies, retries and `.incomplete` resume behave as users know them. prep adds what the client does
not: a fetched file is checked against the size and hash the hub listed (sha256 for LFS files, the git
blob id otherwise) before anything uses it, and a token never appears in an error message.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from prep.errors import PrepError

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as listed: path in the repo, size, and how to check its bytes."""

    path: str
    size: int
    sha256: str | None  # LFS files
    git_oid: str  # the git blob id (sha1 of "blob <size>\\0" + bytes) for files kept in git


def endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once at import; tests and mirrors set it later)."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def resolve_url(url: str) -> str:
    """The plain https URL the hub serves an `hf://` path's bytes at (what HfFileSystem fetches in the end):
    `hf://datasets/ORG/NAME[@REV]/PATH` -> `<endpoint>/datasets/ORG/NAME/resolve/REV/PATH` (REV defaults to
    main; `spaces/` likewise; no prefix is a model). Reading through it needs no repo-info call per
    process, and the loaders' http(s) paths (ranged reads, the shard cache) serve it as they serve any
    store; the hub redirects large files to its CDN, and a token is never sent across that redirect."""
    from urllib.parse import quote, unquote

    rest = url[len("hf://"):].strip("/")
    parts = rest.split("/")
    prefix = parts[0] + "/" if parts[0] in ("datasets", "spaces") else ""
    parts = parts[1:] if prefix else parts
    if len(parts) < 2:
        raise PrepError("an hf:// path names no repository", url,
                        "write hf://datasets/ORG/NAME/path/in/repo (a model: hf://ORG/NAME/path)")
    name, _, revision = parts[1].partition("@")
    path = "/".join(parts[2:])
    rev = quote(unquote(revision or "main"), safe="")
    return f"{endpoint()}/{prefix}{parts[0]}/{name}/resolve/{rev}/{quote(path)}".rstrip("/")


def resolve_token(configured: str | None) -> str | None:
    """The token to send: the config's, else HF_TOKEN; None lets the client use a saved login."""
    return configured or os.environ.get("HF_TOKEN") or None


def scrub(text: str, token: str | None) -> str:
    """Remove a token from text bound for a log or an error."""
    if isinstance(token, str) and token:
        text = text.replace(token, "***")
    return text


def _hub_error(err: Exception, what: str, where: str, token: str | None) -> PrepError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    first = scrub(str(err), token).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, RevisionNotFoundError):
        return PrepError(f"{what}: revision not found ({first})", where,
                         "check download_parquet.revision (a branch, tag or commit sha of the repo)")
    if isinstance(err, GatedRepoError | RepositoryNotFoundError):
        return PrepError(f"{what}: repository not found or not accessible ({first})", where,
                         "check dataset_repo_id; for a private or gated repo set HF_TOKEN (or "
                         "download_parquet.hf_token) to a token with read access")
    if isinstance(err, HfHubHTTPError):
        return PrepError(f"{what}: hub request failed ({first})", where,
                         "check the network, HF_ENDPOINT and the token, then re-run (finished files "
                         "are kept)")
    return PrepError(f"{what}: {type(err).__name__}: {first}", where,
                     f"check the network and HF_ENDPOINT, then re-run (finished files are kept); {LOCAL_FIX}")


CONNECT_SECONDS = 5.0
LOCAL_FIX = "for parquet files you already have, set download_parquet.source_path (the hub is then not used)"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable_reason() -> str | None:
    """Why the hub cannot be reached now (HF_HUB_OFFLINE is set, or HF_ENDPOINT refuses a connection),
    or None. A connect, not the client's retries (about 24 s per file). Behind a proxy the client's own
    connection decides (None)."""
    from urllib.parse import urlsplit

    if _offline():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlsplit(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        return f"cannot reach the hub at {endpoint()} ({err.strerror or err})"
    return None


def require_reachable(where: str) -> None:
    """Fail at once when the hub cannot be reached (offline, a wrong HF_ENDPOINT), instead of after the
    client's retries."""
    if _offline():
        raise PrepError("HF_HUB_OFFLINE is set, so the hub cannot be listed", where,
                        f"unset HF_HUB_OFFLINE, or {LOCAL_FIX}")
    reason = unreachable_reason()
    if reason is not None:
        raise PrepError(reason, where, f"check the network and HF_ENDPOINT; {LOCAL_FIX}")


def list_parquet(repo_id: str, revision: str, pattern: str, token: str | None) -> list[RemoteFile]:
    """Files of the dataset repo at `revision` whose path (or base name) matches `pattern`, sorted."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    where = f"hub dataset {repo_id}@{revision}"
    require_reachable(where)
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        entries = list(api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True))
    except Exception as err:  # HTTP errors, and the transport's own (its HTTP client varies by version)
        raise _hub_error(err, "cannot list the repository", where, token) from None
    out = []
    for e in entries:
        if not isinstance(e, RepoFile) or not matches(e.path, pattern):
            continue  # folders
        out.append(RemoteFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None, e.blob_id))
    return sorted(out, key=lambda f: f.path)


def matches(path: str, pattern: str) -> bool:
    """NeMo's parquet_pattern is a base-name glob ("*.parquet"); a pattern with '/' matches the path."""
    return fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern)


def file_digests(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) in one read."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\x00" % size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    return size, sha256.hexdigest(), git.hexdigest()


def verify(path: Path, remote: RemoteFile) -> str | None:
    """None when the local file is exactly the listed one, else why not (used before trusting a file)."""
    if not path.is_file():
        return "missing"
    size, sha256, git = file_digests(path)
    if size != remote.size:
        return f"{size} bytes, the hub lists {remote.size}"
    if remote.sha256 is not None and sha256 != remote.sha256:
        return "sha256 differs from the hub's"
    if remote.sha256 is None and git != remote.git_oid:
        return "git blob id differs from the hub's"
    return None


def fetch(repo_id: str, revision: str, remote: RemoteFile, local_dir: Path, cache_dir: Path,
          token: str | None) -> tuple[Path, bool]:
    """Make `local_dir/<path>` the verified file; returns (path, whether bytes were downloaded).

    A file already there and verified is not fetched again. A partial or stale one is replaced:
    huggingface_hub downloads into `.incomplete` and renames, so a killed download never sits at the
    final path, and prep re-checks size and hash because the client trusts a file it has metadata for.
    """
    from huggingface_hub import hf_hub_download

    target = local_dir / remote.path
    where = f"hub dataset {repo_id}@{revision}: {remote.path}"
    if verify(target, remote) is None:
        return target, False
    problem = None
    for force in (False, True):
        try:
            got = Path(hf_hub_download(repo_id, remote.path, repo_type="dataset", revision=revision,
                                       local_dir=local_dir, cache_dir=cache_dir, endpoint=endpoint(),
                                       token=token, force_download=force))
        except Exception as err:  # the client raises many types; all become one line without the token
            raise _hub_error(err, "download failed", where, token) from None
        problem = verify(got, remote)
        if problem is None:
            return got, True
    raise PrepError(f"downloaded file does not match the hub's listing ({problem})", where,
                    "the file changed on the hub since planning, or the transfer is corrupted: re-run")
