"""download_parquet: bring the caption+URL parquet files in, from the HuggingFace hub or a path.

One task per source file: fetch it (hub: `huggingface_hub`, verified against the hub's size and hash;
local or fsspec path: read in place), check that download_images' URL and caption columns exist, then
split it with pyarrow into `parquet_subpartitions` parts named `<source-stem>.part<k>.parquet`, rows
in order and counts exact. Parts sit at the top of `output_dir` (what download_images reads); fetched
originals are kept under `output_dir/source/` unless `delete_source: true`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr

from prep.errors import PrepError
from prep.formats.atomic import temp_name, write_text_atomic
from prep.formats.checksum import file_checksum
from prep.formats.urls import redact_url
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "download_parquet"
TITLE = "fetch caption+URL parquet files from a HuggingFace dataset repo or a path, split into parts"
VERSION = 1
TORCHRUN_RANKS = False
SOURCE_DIR = "source"
NOT_PARQUET = ("replace it with a real parquet file, or narrow download_parquet.source_path / "
               "parquet_pattern so it is not taken")
_MASK = "**********"  # what a SecretStr becomes when the config travels to a worker as JSON


class Config(StageConfig):
    output_dir: Path | None = Field(None, description="where parquet parts go (default: <root>/parquet)")
    parquet_subpartitions: int = Field(1, ge=1, description="split each file into this many parts "
                                       "(more, shorter download_images tasks)")
    parquet_pattern: str = Field("*.parquet", description="glob of files to take (base name; with a '/', "
                                 "the path in the repo)")
    revision: str = Field("main", description="hub branch, tag or commit sha to download from")
    hf_token: SecretStr | None = Field(None, description="hub token for private or gated repos (default: "
                                       "$HF_TOKEN); never printed")
    source_path: str | None = Field(None, description="local or fsspec path/glob of parquet files "
                                    "(e.g. /data/*.parquet, s3://b/x/*.parquet); when set the hub is "
                                    "not used")
    delete_source: bool = Field(False, description="delete each original file once its parts are written "
                                "(a local source_path file too)")


# --------------------------------------------------------------------------------------------- decisions


def stem_of(rel_path: str) -> str:
    """A part-name stem unique across sources: the relative path without `.parquet`, '/' as '__'."""
    name = rel_path[: -len(".parquet")] if rel_path.endswith(".parquet") else rel_path
    return name.replace("/", "__")


def part_name(stem: str, k: int) -> str:
    return f"{stem}.part{k}.parquet"


def stale_parts(names: Iterable[str], stem: str, k: int) -> list[str]:
    """The names among `names` that are parts of `stem` beyond its first `k`: an earlier split into more
    parts. Left beside the new parts, download_images would fetch their rows a second time."""
    part = re.compile(rf"{re.escape(stem)}\.part([0-9]+)\.parquet")
    return sorted(n for n in names if (m := part.fullmatch(n)) and part_name(stem, int(m[1])) == n
                  and int(m[1]) >= k)


def part_rows(n: int, k: int) -> list[int]:
    """Rows per part: as equal as possible, the larger parts first, summing to exactly n."""
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard, to make paths relative to it."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def _url_source(url: str) -> dict[str, Any]:
    """One http(s) file, taken as is: its query (a presigned URL's signature) is part of the address,
    not a glob, and its name comes from the path alone."""
    from urllib.parse import unquote, urlsplit

    import fsspec

    shown = redact_url(url)
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    if not name:
        raise PrepError("the URL names no file", f"download_parquet.source_path={shown}",
                        "give the URL of one parquet file (a folder listing is not read over http)")
    try:
        info = fsspec.filesystem(urlsplit(url).scheme).info(url)
    except (OSError, ValueError) as err:
        raise PrepError(f"cannot read the source URL ({type(err).__name__})",
                        f"download_parquet.source_path={shown}",
                        "check that the URL is reachable and, if presigned, not expired") from None
    if info.get("size") is None:
        raise PrepError("the server gives no size for the source URL",
                        f"download_parquet.source_path={shown}",
                        "serve the file with a Content-Length, or download it and give its local path")
    return {"kind": "path", "url": url, "rel": name, "size": int(info["size"]),
            "mtime": str(info.get("ETag") or info.get("LastModified") or "")}


def _token(cfg: Config, opts: RunOptions) -> str | None:
    from prep.hub import resolve_token

    secret = opts.extra.get("hf_token") or cfg.hf_token
    value = secret.get_secret_value() if secret is not None else None
    return resolve_token(None if value == _MASK else value)


# ---------------------------------------------------------------------------------------------- planning


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_output_dir(root)]


def _output_dir(root: PrepConfig) -> Path:
    out = root.download_parquet.output_dir
    if out is None:
        raise PrepError("download_parquet.output_dir is not set", "config",
                        "set download_parquet.output_dir or dataset_output_root")
    return Path(out)


def _local_sources(pattern: str, file_pattern: str, *, none_ok: bool = False) -> list[dict[str, Any]]:
    """The files a path, glob or folder names (a folder: its files matching parquet_pattern); none is an
    error unless `none_ok`."""
    import fsspec

    if pattern.startswith(("http://", "https://")):
        return [_url_source(pattern)]
    try:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        if len(paths) == 1 and fs.isdir(paths[0]):
            pattern = pattern.rstrip("/") + "/" + file_pattern
            fs, _, paths = fsspec.get_fs_token_paths(pattern)
    except (ValueError, ImportError, OSError) as err:
        raise PrepError(f"cannot open source_path ({err})", f"download_parquet.source_path={pattern}",
                        "give a local path/glob or an fsspec URL whose filesystem package is "
                        "installed") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    base = fs._strip_protocol(_glob_base(pattern)) if _glob_base(pattern) else ""
    out = []
    for p in sorted(paths):
        info = fs.info(p)
        if info.get("type") != "file":
            continue
        rel = p[len(base):].lstrip("/") if base and p.startswith(base) else p.rsplit("/", 1)[-1]
        url = p if protocol in ("file", "local") else fs.unstrip_protocol(p)  # http(s) paths keep theirs
        out.append({"kind": "path", "url": url, "rel": rel, "size": int(info["size"]),
                    "mtime": str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")})
    if not out and not none_ok:
        raise PrepError("no parquet file matches", f"download_parquet.source_path={pattern}",
                        "check the path or glob (e.g. /data/laion/*.parquet)")
    return out


def _hub_sources(root: PrepConfig, cfg: Config, opts: RunOptions) -> list[dict[str, Any]]:
    from prep.hub import list_parquet

    repo = root.dataset_repo_id
    if not repo:
        raise PrepError("neither dataset_repo_id nor download_parquet.source_path is set", "config",
                        "set dataset_repo_id (a HuggingFace dataset, e.g. laion/laion-art) or "
                        "download_parquet.source_path (a path or glob of parquet files)")
    files = list_parquet(repo, cfg.revision, cfg.parquet_pattern, _token(cfg, opts))
    if not files:
        raise PrepError(f"no file of the repository matches parquet_pattern {cfg.parquet_pattern!r}",
                        f"hub dataset {repo}@{cfg.revision}", "check download_parquet.parquet_pattern")
    return [{"kind": "hub", "repo": repo, "revision": cfg.revision, "rel": f.path, "size": f.size,
             "sha256": f.sha256, "git_oid": f.git_oid} for f in files]


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    cfg: Config = root.download_parquet
    out = _output_dir(root).resolve()
    if cfg.hf_token is not None and cfg.hf_token.get_secret_value() != _MASK:
        opts.extra["hf_token"] = cfg.hf_token  # workers get the config as JSON, where a SecretStr is masked
    if cfg.source_path:
        from prep.stages.parquet_parts import check_columns, read_columns

        deleted = _deleted_sources(out, cfg.source_path) if cfg.delete_source else []
        sources = _local_sources(cfg.source_path, cfg.parquet_pattern, none_ok=bool(deleted))
        for s in sources:  # a local schema costs a footer read: check before any task runs
            check_columns(read_columns(s["url"], NOT_PARQUET, redact_url(s["url"])),
                          root.download_images.required_columns(), redact_url(s["url"]))
        listed = {stem_of(s["rel"]) for s in sources}
        sources += [s for s in deleted if stem_of(s["rel"]) not in listed]
    else:
        sources = _hub_sources(root, cfg, opts)
    stems: dict[str, str] = {}
    tasks = []
    for s in sources:
        stem = stem_of(s["rel"])
        if stem in stems:
            raise PrepError(f"sources {stems[stem]!r} and {s['rel']!r} would both be named {stem!r}",
                            "download_parquet", "narrow parquet_pattern / source_path so names differ")
        stems[stem] = s["rel"]
        parts = tuple(str(out / part_name(stem, k)) for k in range(cfg.parquet_subpartitions))
        keep = s["kind"] == "hub" and not cfg.delete_source
        outputs = parts + ((str(out / SOURCE_DIR / s["rel"]),) if keep else ())
        payload = {**s, "stem": stem, "subpartitions": cfg.parquet_subpartitions,
                   "delete_source": cfg.delete_source, "output_dir": str(out),
                   "check": _columns_to_check(root)}
        tasks.append(Task(stem, payload, outputs, weight=max(1, s["size"] >> 20)))
    return tasks


def _columns_to_check(root: PrepConfig) -> list[str]:
    di = root.download_images
    return [c for c in (di.url_col, di.caption_col) if c] if di.enable else []


# ----------------------------------------------------------------------------------------------- running


def _fetch(task: Task, cfg: Config, opts: RunOptions) -> tuple[Path, bool]:
    """A local path holding the source's bytes, and whether they were downloaded now."""
    p = task.payload
    out = Path(p["output_dir"])
    if p["kind"] == "hub":
        from prep.hub import RemoteFile, fetch

        remote = RemoteFile(p["rel"], p["size"], p["sha256"], p["git_oid"])
        return fetch(p["repo"], p["revision"], remote, out / SOURCE_DIR, out / ".prep" / "hf_cache",
                     _token(cfg, opts))
    import fsspec

    fs, path = fsspec.core.url_to_fs(p["url"])
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        if not os.path.isfile(path):
            if (out / _DELETED / f"{p['stem']}.json").is_file():  # re-running cannot bring it back
                raise PrepError("the source was deleted once its parts were written (delete_source: "
                                "true), so they cannot be made again with other settings",
                                redact_url(p["url"]),
                                "restore the source file, or set download_parquet.parquet_subpartitions back "
                                "to what it was split with")
            raise PrepError("source file disappeared since planning", redact_url(p["url"]),
                            "re-run to plan again")
        return Path(path), False
    target = out / SOURCE_DIR / p["rel"]
    if target.is_file() and target.stat().st_size == p["size"]:
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        try:
            fs.get_file(path, str(tmp))
        except Exception as err:  # the http client's own errors quote the whole URL, signature and all
            raise PrepError(f"cannot fetch the source ({type(err).__name__})", redact_url(p["url"]),
                            "re-run; if the URL is presigned, give a fresh one") from None
        if tmp.stat().st_size != p["size"]:
            raise PrepError(f"copied {tmp.stat().st_size} bytes, the source lists {p['size']}",
                            redact_url(p["url"]),
                            "re-run; the source changed or the transfer was cut")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, True


def split_parquet(src: Path, out_dir: Path, stem: str, k: int, *, link_ok: bool) -> list[tuple[Path, int]]:
    """Write `k` parts of `src` in row order (atomic each); returns (path, rows) per part."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    sizes = part_rows(pf.metadata.num_rows, k)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = [out_dir / part_name(stem, i) for i in range(k)]
    if k == 1:
        tmp = temp_name(finals[0])
        try:
            if link_ok:
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
            else:
                shutil.copyfile(src, tmp)
            os.replace(tmp, finals[0])
        finally:
            tmp.unlink(missing_ok=True)
        return [(finals[0], sizes[0])]
    batches = pf.iter_batches(batch_size=65536)
    pending = None  # the rest of a batch that crossed a part boundary
    for final, want in zip(finals, sizes, strict=True):
        tmp = temp_name(final)
        try:
            with pq.ParquetWriter(tmp, pf.schema_arrow) as w:
                left = want
                while left:
                    if pending is None or pending.num_rows == 0:
                        pending = next(batches)
                    take = pending.slice(0, left)
                    w.write_batch(take)
                    left -= take.num_rows
                    pending = pending.slice(take.num_rows)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return list(zip(finals, sizes, strict=True))


_DELETED = ".prep/deleted_sources"  # under output_dir: one record per source that delete_source removed
_SOURCE_KEYS = ("kind", "url", "rel", "size", "mtime")  # a local source as `_local_sources` lists it


def _deleted_sources(out: Path, pattern: str) -> list[dict[str, Any]]:
    """The local sources of `pattern` that this stage deleted after writing their parts, as they were
    listed then: a re-run plans their tasks again (and finds them done) instead of failing on the files
    it removed itself."""
    found = []
    for f in sorted((out / _DELETED).glob("*.json")):
        record = json.loads(f.read_text())
        if record["source_path"] == pattern:
            found.append(record["source"])
    return found


def _delete_source(task: Task, src: Path, pattern: str | None) -> None:
    p = task.payload
    if p["kind"] == "path":
        # recorded first: killed between the two, a re-run finds the file and the record, and plans the
        # file; the other way round it would find neither
        record = {"source_path": pattern, "source": {k: p[k] for k in _SOURCE_KEYS}}
        write_text_atomic(Path(p["output_dir"]) / _DELETED / f"{p['stem']}.json", json.dumps(record))
        import fsspec

        fs, path = fsspec.core.url_to_fs(p["url"])
        fs.rm(path)
    if src.exists():
        src.unlink()


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    import pyarrow.parquet as pq

    from prep.stages.parquet_parts import check_columns, reading_parquet

    cfg: Config = root.download_parquet
    p = task.payload
    src, downloaded = _fetch(task, cfg, opts)
    where = redact_url(p["url"]) if p.get("url") else f"{p.get('repo')}: {p['rel']}"
    with reading_parquet(where, NOT_PARQUET):
        names = pq.read_schema(src).names
    if p["check"]:
        check_columns(names, root.download_images.required_columns(), where)
    out = Path(p["output_dir"])
    own_copy = src.resolve().is_relative_to((out / SOURCE_DIR).resolve())
    parts = split_parquet(src, out, p["stem"], p["subpartitions"], link_ok=own_copy)
    stale = stale_parts(os.listdir(out), p["stem"], p["subpartitions"])
    for name in stale:
        (out / name).unlink(missing_ok=True)
    total = pq.ParquetFile(src).metadata.num_rows
    outputs: dict[str, dict[str, Any]] = {}
    for path, rows in parts:
        got = pq.ParquetFile(path).metadata.num_rows
        if got != rows:
            raise PrepError(f"part holds {got} rows, expected {rows}", str(path), "re-run the task (--force)")
        outputs[str(path)] = {"bytes": path.stat().st_size, "checksum": file_checksum(path)}
    if p["delete_source"]:
        _delete_source(task, src, cfg.source_path)
    elif p["kind"] == "hub":
        outputs[str(src)] = {"bytes": src.stat().st_size,
                             "checksum": f"sha256:{p['sha256']}" if p["sha256"] else file_checksum(src)}
    return TaskResult(
        task.id,
        counts={"files": 1, "rows": total, "parts": len(parts), "files_downloaded": int(downloaded),
                "bytes_downloaded": p["size"] if downloaded else 0, "stale_parts_removed": len(stale)},
        notes=[f"{p['stem']}: removed {len(stale)} part(s) of an earlier split into more parts (first: "
               f"{stale[0]})"] if stale else [],
        data={"stem": p["stem"], "rows": total, "parts": [[path.name, rows] for path, rows in parts]},
        outputs=outputs,
    )


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    rows = sum(r.data["rows"] for r in results)
    parts = sum(len(r.data["parts"]) for r in results)
    fetched = sum(r.counts.get("files_downloaded", 0) for r in results if r.status == "done")
    return [f"{len(results)} source file(s), {rows:,} rows in {parts} part(s) under {_output_dir(root)}; "
            f"{fetched} file(s) downloaded in this run, the rest already present and verified"]
