"""ingest_local: images already on disk (or behind fsspec URLs) into tars in download_images' layout.

Sources: an image folder, searched recursively, with captions in sidecar files (`NAME.txt`,
`NAME.caption`), in a captions file (FluxFlow's `name<TAB>caption` lines, or a JSON/JSONL/CSV map); or a
table (parquet/CSV/JSONL) of image paths or fsspec URLs with a caption column and extra columns.

The plan lists every image, sorted by its relative path, and cuts the list into shards of
`number_sample_per_shard`; one task per shard. A task reads each image, decodes it fully (a bad one is
dropped and reported by path and reason), keeps its original bytes (a PNG stays PNG) unless a resize or
re-encode is asked for (img2dataset's Resizer, after EXIF orientation is applied), and writes
`output_dir/<part>/NNNNN.tar` + `.parquet` + `_stats.json` with img2dataset's names and fields, so
reorganize_tar and the later stages read it as they read download_images' output. Keys are stable and
unique: a slug of the relative path plus a hash of it; the path itself is kept in each sample's json. A
URL that carries user info or a query (a presigned URL's signature) is recorded, keyed, reported and
named in errors without them (`prep.formats.urls.shown_url`): a signature is a secret, and one that
expires would make keys change at every re-signing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.pixels import WIDE_GRAY, eight_bit
from prep.formats.tar_write import FileSlice, MemberData, write_shard
from prep.formats.urls import http_status, is_transient_status, network_failure, redact_urls_in, shown_url
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult

if TYPE_CHECKING:
    from prep.config import PrepConfig
from prep.stages.parquet_parts import (
    key_prefix,
    load_img2dataset,
    other_parts_warning,
    shard_name,
    write_parquet,
)

NAME = "ingest_local"
TITLE = "turn an image folder or a table of image paths/URLs into checked tars (download_images' layout)"
VERSION = 1
TORCHRUN_RANKS = False
DROPPED_REPORT = "ingest_local.dropped.jsonl"
NOTES_NAMED = 5  # dropped images named in the summary per task (every one goes to the report file)
SLUG_CHARS = 64  # the readable part of a key: the tail of the relative path
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
              "TIFF": "tiff"}  # PIL's format name -> the member extension the bytes are stored under
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# reasons that may pass (a server's error answer, a timeout, a cut connection): the next run tries again
TRANSIENT = ("server_error", "timeout", "connection_error")
# why an image was dropped -> img2dataset's status for it: not readable, or read but rejected
UNREADABLE = ("missing_file", "read_error", "duplicate_path", "no_path", *TRANSIENT)
GONE = (404, 410)  # HTTP answers that mean the file is not there
RESERVED_JSON = ("key", "path", "caption", "width", "height", "original_width", "original_height",
                 "exif_orientation", "md5", "sha256", "sha512")
_SHARD_FILE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")
_NAME, _CAPTION = "\0name", "\0caption"  # a map's key and bare value (no column can be named so)
_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names its BytesIO: no run-dependent bytes


class Config(StageConfig):
    enable: bool = Field(False, description="run this stage in `prep run all` (off unless you ingest local "
                         "data; then switch download_parquet and download_images off)")
    input_dir: Path | None = Field(None, description="image folder, searched recursively (hidden files and "
                                   "folders skipped); set this or table")
    table: str | None = Field(None, description="parquet/CSV/JSONL file or glob (local or fsspec: s3://, "
                              "gs://) with one image path or URL per row; set this or input_dir")
    output_dir: Path | None = Field(None, description="tars, one folder per part (default: "
                                    "<root>/tarfiles_ingested)")
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"],
                                        description="file extensions (any case) taken as images in input_dir")
    caption_extensions: list[str] = Field(default_factory=lambda: ["txt", "caption"],
                                          description="sidecar caption files NAME.EXT beside NAME.png, "
                                          "first found wins")
    captions_file: str | None = Field(None, description="captions for input_dir: FluxFlow's "
                                      "`name<TAB>caption` lines, or a .json/.jsonl/.csv map (path_col, "
                                      "caption_col); names are paths relative to input_dir, with or "
                                      "without extension; it wins over sidecars")
    path_col: str = Field("path", description="table/map column with the image path (relative to base_dir) "
                          "or URL")
    caption_col: str | None = Field("caption", description="table/map column with the caption; null for "
                                    "none")
    save_additional_columns: list[str] | None = Field(None, description="extra table/map columns copied "
                                                      "into each sample's json and the shard parquet")
    base_dir: str | None = Field(None, description="folder relative table paths start from (default: the "
                                 "table's own folder)")
    missing_caption: Literal["keep", "drop"] = Field("keep", description="an image without caption: keep it "
                                                     "with an empty .txt (counted) or drop it (reported)")
    number_sample_per_shard: int = Field(1000, ge=1, description="images per tar (one task each)")
    oom_shard_count: int = Field(5, ge=1, description="digits in shard names (00000.tar)")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "no", description="img2dataset's resize mode; 'no' keeps the original bytes")
    image_size: int = Field(256, ge=1, description="target size when resize_mode is not 'no'")
    resize_only_if_bigger: bool = Field(False, description="only downscale, never upscale (smaller images "
                                        "keep their bytes)")
    upscale_interpolation: str = Field("lanczos", description="OpenCV interpolation for upscaling")
    downscale_interpolation: str = Field("area", description="OpenCV interpolation for downscaling")
    reencode: bool = Field(False, description="re-encode every image to encode_format, resized or not")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format of resized or "
                                                         "re-encoded images")
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality (png: compression 0-9)")
    min_image_size: int = Field(0, ge=0, description="drop images whose smaller side is below this")
    max_image_area: float | None = Field(None, gt=0, description="drop images with more pixels than this "
                                         "(null: no limit)")
    max_aspect_ratio: float | None = Field(None, gt=0, description="drop images more elongated than this "
                                           "(null: no limit)")
    compute_hash: Literal["md5", "sha256", "sha512"] | None = Field("sha256", description="hash of the "
                                                                    "original file stored in each json")

    @field_validator("image_extensions", "caption_extensions", mode="after")
    @classmethod
    def _lower_no_dots(cls, v: list[str]) -> list[str]:
        return [e.lstrip(".").lower() for e in v]


# --------------------------------------------------------------------------------------------- decisions


def sample_key(rel: str) -> str:
    """A stable, unique WebDataset key for a relative path: the path's tail as [A-Za-z0-9_-] (readable,
    no dots or slashes) plus 48 bits of its hash (unique: duplicate stems, unicode names, a.png/a.jpg)."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    slug = key_prefix(stem).strip("_-")
    slug = re.sub(r"_+", "_", slug)[-SLUG_CHARS:].lstrip("_-")
    return f"{slug}_{digest}" if slug else digest


def needs_resize(mode: str, size: int, only_if_bigger: bool, width: int, height: int) -> bool:
    """Whether img2dataset's Resizer changes an image of this size (its own rule, so an image it would
    leave alone keeps its original bytes here)."""
    if mode == "no":
        return False
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    return not only_if_bigger or side > size


def size_filter(width: int, height: int, args: dict[str, Any]) -> str | None:
    """img2dataset's size filters; the reason slug (as download_images reports it) or None."""
    if min(width, height) < args["min_image_size"]:
        return "too_small"
    if args["max_image_area"] is not None and width * height > args["max_image_area"]:
        return "area_too_large"
    if args["max_aspect_ratio"] is not None and max(width, height) / max(1, min(width, height)) > \
            args["max_aspect_ratio"]:
        return "aspect_ratio_too_large"
    return None


def status_of(reason: str) -> str:
    """img2dataset's status for a dropped image: failed_to_download when it could not be read at all,
    failed_to_resize when it was read and rejected."""
    return "failed_to_download" if reason in UNREADABLE else "failed_to_resize"


def error_text(err: BaseException, src: str) -> str:
    """What `err` says, with `src` and any URL in it shown as `shown_url` shows them (a library's
    message may quote the URL it was given, signature and all)."""
    return redact_urls_in(str(err).replace(src, shown_url(src)) if src else str(err))


def read_failure(err: BaseException, src: str) -> tuple[str, str]:
    """(reason, message) for a file or URL that could not be read. A 404/410 or a missing local file is
    `missing_file`; a server error (5xx, 408, 425, 429) is `server_error` and a timeout or a failed
    connection is `timeout` / `connection_error`: those may pass, so they are never taken for a missing
    file. The exception's causes are looked at too: fsspec's `open` reports any failed request as a
    FileNotFoundError raised from the real one. The message shows `src` by `shown_url`."""
    shown = shown_url(src)
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    for e in chain:
        status = http_status(e)
        if status is not None:
            why = getattr(e, "message", None) or getattr(e, "reason", None) or ""
            why = redact_urls_in(why) if isinstance(why, str) else ""
            message = f"{shown}: HTTP {status}{f' {why}' if why else ''}"
            if status in GONE:
                return "missing_file", message
            return ("server_error" if is_transient_status(status) else "read_error"), message
        how = network_failure(e)
        if how == "timeout":
            return "timeout", f"{shown}: timed out ({type(e).__name__})"
        if how is not None:
            return "connection_error", f"{shown}: {type(e).__name__}: {error_text(e, src)}"
    if isinstance(err, FileNotFoundError):
        return "missing_file", f"{shown} does not exist"
    return "read_error", f"{type(err).__name__}: {error_text(err, src)}"


def shown_path(rel: str) -> str:
    """A relative path as the json, the parquet and the reports record it: UTF-8 text, so the bytes of a
    file name that is not UTF-8 (Linux allows any) appear as \\xNN instead of failing its whole shard."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def caption_names(rel: str) -> tuple[str, str]:
    """The names a captions-file line may use for an image: its relative path, with or without extension."""
    return rel, (rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel)


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class Found:
    """One image the plan found: `rel` makes the key, `path` is what the json records, `src` is read."""

    rel: str
    path: str
    src: str
    stat: list[int] | None = None  # [size, mtime_ns] of a local file: a changed image re-runs its task
    caption: str | None = None
    caption_file: str | None = None
    caption_stat: list[int] | None = None
    extra: dict[str, Any] | None = None
    drop: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _walk(folder: Path, skip: Path | None, unread: list[str]) -> Iterator[tuple[str, os.stat_result]]:
    """(relative POSIX path, stat) of every file under `folder`, hidden entries and `skip` excluded.
    Symlinked folders are followed, each folder read once (a link back up makes no loop; a folder
    reached twice is listed under the first path, in sorted order); entries that are neither a file nor
    a folder (a broken link, a socket) go to `unread`."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        st = d.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if skip is None or Path(e.path).resolve() != skip:
                    stack.append(Path(e.path))
            elif e.is_file():
                yield Path(e.path).relative_to(folder).as_posix(), e.stat()
            else:
                unread.append(Path(e.path).relative_to(folder).as_posix())


def _json_safe(value: Any) -> Any:
    """A table value as JSON (dates, decimals and bytes as strings), so payloads and jsons stay JSON."""
    return json.loads(json.dumps(value, default=str))


def read_records(path: str, where: str) -> list[dict[str, Any]]:
    """Rows of a parquet/CSV/JSONL/JSON file (local or fsspec) as dicts."""
    import fsspec

    lower = shown_url(path).lower()  # a presigned URL ends in its query, not its extension
    try:
        with fsspec.open(path, "rb") as f:
            if lower.endswith((".parquet", ".pq")):
                import pyarrow.parquet as pq

                return pq.read_table(f).to_pylist()
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise PrepError("file not found", where, "check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PrepError(f"cannot read it ({type(err).__name__}: {error_text(err, path)})", where,
                        "pass a readable parquet, CSV, JSONL or JSON file") from None
    try:
        if lower.endswith(".csv"):
            return list(csv.DictReader(io.StringIO(text)))
        if lower.endswith((".jsonl", ".ndjson")):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if lower.endswith(".json"):
            doc = json.loads(text)
            if isinstance(doc, list):
                return doc
            if isinstance(doc, dict):  # {name: caption} or {name: {caption_col: ..., extra: ...}}
                return [{_NAME: k, **(v if isinstance(v, dict) else {_CAPTION: v})} for k, v in doc.items()]
            raise ValueError("a JSON map is an object or a list of records")
    except (ValueError, csv.Error) as err:
        raise PrepError(f"cannot parse it ({err})", where, "fix the file") from None
    # FluxFlow's captions file: `name<TAB>caption` per line
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:
            raise PrepError(f"line {n} has no TAB between name and caption", f"{where}:{n}",
                            "write `name<TAB>caption` per line, or use a .json/.jsonl/.csv map")
        rows.append({_NAME: name, _CAPTION: caption})
    return rows


def _columns(cfg: Config, rows: list[dict[str, Any]], where: str) -> None:
    """Fail before any image is read when a column the config names is absent (first 1000 rows)."""
    if not rows:
        return
    names = set().union(*(r.keys() for r in rows[:1000]))
    keyed = _NAME in names  # a {name: ...} map or a captions file: the name stands for path_col
    want = ([] if keyed else [cfg.path_col]) + ([cfg.caption_col] if cfg.caption_col and not keyed else [])
    want += list(cfg.save_additional_columns or [])
    missing = [c for c in want if c not in names]
    if missing:
        raise PrepError(f"column(s) {', '.join(map(repr, missing))} not found; it has: "
                        f"{', '.join(sorted(repr(n) for n in names - {_NAME, _CAPTION}))}", where,
                        "set ingest_local.path_col / caption_col / save_additional_columns to its columns")


def _row_fields(cfg: Config, row: dict[str, Any]) -> tuple[Any, Any, dict[str, Any] | None]:
    path = row.get(_NAME, row.get(cfg.path_col))
    caption = row.get(_CAPTION, row.get(cfg.caption_col) if cfg.caption_col else None)
    extra = {c: _json_safe(row.get(c)) for c in cfg.save_additional_columns or []} or None
    return path, caption, extra


def captions_map(cfg: Config) -> tuple[dict[str, tuple[str | None, dict[str, Any] | None]], int]:
    """name -> (caption, extra columns) from `captions_file`, and how many lines repeat a name."""
    if cfg.captions_file is None:
        return {}, 0
    where = f"ingest_local.captions_file {shown_url(cfg.captions_file)}"
    rows = read_records(cfg.captions_file, where)
    _columns(cfg, rows, where)
    out: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
    repeated = 0
    for row in rows:
        name, caption, extra = _row_fields(cfg, row)
        name = str(name).strip().removeprefix("./")
        if name in out:
            repeated += 1
            continue
        out[name] = (None if caption is None else str(caption), extra)
    return out, repeated


def find_folder_images(cfg: Config, folder: Path, out: Path) -> tuple[list[Found], list[str]]:
    """Every image under `folder` with its caption source, sorted by relative path; and plan notes."""
    if not folder.is_dir():
        raise PrepError("image folder does not exist", str(folder), "set ingest_local.input_dir to a folder")
    images: list[tuple[str, os.stat_result]] = []
    sidecars: dict[str, dict[str, tuple[str, os.stat_result]]] = {}
    other = 0
    image_exts, caption_exts = set(cfg.image_extensions), cfg.caption_extensions
    local_captions = cfg.captions_file is not None and "://" not in cfg.captions_file
    captions_path = Path(str(cfg.captions_file)).resolve() if local_captions else None
    unread: list[str] = []
    for rel, st in _walk(folder, out, unread):
        base, dot, ext = rel.rpartition(".")
        ext = ext.lower()
        if captions_path is not None and (folder / rel).resolve() == captions_path:
            continue
        if dot and "/" not in ext and ext in image_exts:
            images.append((rel, st))
        elif dot and "/" not in ext and ext in caption_exts:
            sidecars.setdefault(base, {})[ext] = (rel, st)
        else:
            other += 1
    images.sort(key=lambda x: x[0])
    mapped, repeated = captions_map(cfg)
    used: set[str] = set()
    found: list[Found] = []
    stems_with_image = set()
    for rel, st in images:
        item = Found(rel, shown_path(rel), str(folder / rel), [st.st_size, st.st_mtime_ns])
        for name in caption_names(rel):
            if name in mapped:
                item.caption, item.extra = mapped[name]
                used.add(name)
                break
        stem = caption_names(rel)[1]
        stems_with_image.add(stem)
        if item.caption is None:
            side = next((sidecars[stem][e] for e in caption_exts if e in sidecars.get(stem, {})), None)
            if side is not None:
                item.caption_file, item.caption_stat = str(folder / side[0]), [side[1].st_size,
                                                                                  side[1].st_mtime_ns]
        found.append(item)
    notes: list[str] = []
    if unread:
        notes.append(f"{len(unread)} entr{'y' if len(unread) == 1 else 'ies'} under {folder} left out: "
                     f"neither a file nor a folder, e.g. a broken link (first: {sorted(unread)[0]!r})")
    orphans = sorted(set(mapped) - used)
    if orphans:
        notes.append(f"{len(orphans)} caption(s) in {shown_url(str(cfg.captions_file))} name no image "
                     f"(first: {orphans[0]!r})")
    if repeated:
        notes.append(f"{repeated} line(s) of {shown_url(str(cfg.captions_file))} repeat a name; the first "
                     "one is used")
    lonely = sorted(s for s in sidecars if s not in stems_with_image)
    if lonely:
        notes.append(f"{len(lonely)} sidecar caption file(s) have no image beside them "
                     f"(first: {lonely[0]!r})")
    if other:
        notes.append(f"{other} other file(s) under {folder} are neither images "
                     f"({', '.join(cfg.image_extensions)}) nor captions: ignored")
    return found, notes


def table_files(pattern: str) -> list[str]:
    """The table files a path or glob names (local or fsspec), sorted."""
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    files = sorted(p for p in paths if not fs.isdir(p))
    if not files:
        raise PrepError("no table file matches", f"ingest_local.table {shown_url(pattern)}",
                        "point ingest_local.table at a parquet/CSV/JSONL file or a glob of them")
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    # an http path is the whole URL already: unstrip_protocol adds the scheme only where it is missing
    return files if proto in ("file", "local") else [fs.unstrip_protocol(p) for p in files]


def resolve_path(path: str, base: str) -> str:
    """Where a table's path points: a URL or absolute path as is, else relative to `base`."""
    if "://" in path or os.path.isabs(path):
        return path
    return f"{base.rstrip('/')}/{path}" if "://" in base else os.path.normpath(os.path.join(base, path))


def find_table_images(cfg: Config, table: str, part: str, seen: dict[str, str]) -> list[Found]:
    """The rows of one table as images, in row order; a path already seen (here or in an earlier table)
    is dropped as duplicate_path. Keys come from `<part>/<path as written>`, so two tables in two folders
    may both name `a.png`; a URL with user info or a query is recorded and keyed as `shown_url` shows
    it, so the same object at two signatures is one image."""
    where = f"ingest_local.table {shown_url(table)}"
    rows = read_records(table, where)
    _columns(cfg, rows, where)
    base = cfg.base_dir or (table.rsplit("/", 1)[0] if "://" in table else str(Path(table).parent))
    found: list[Found] = []
    for row in rows:
        raw, caption, extra = _row_fields(cfg, row)
        path = "" if raw is None else str(raw).strip()
        src = resolve_path(path, base) if path else ""
        address = shown_url(src)
        shown = (address if address != src else path) or f"<row {len(found)} of {shown_url(table)}>"
        item = Found(f"{part}/{shown.removeprefix('./')}", shown, src,
                     caption=None if caption is None else str(caption), extra=extra)
        if not path:
            item.drop = "no_path"
        elif address in seen:
            item.drop = "duplicate_path"
        else:
            seen[address] = table
            if "://" not in src:
                try:
                    st = os.stat(src)
                    item.stat = [st.st_size, st.st_mtime_ns]
                except OSError:
                    pass  # the task reports it as missing_file
        found.append(item)
    return found


# ---------------------------------------------------------------------------------------------- planning


def _dirs(root: PrepConfig) -> Path:
    cfg: Config = root.ingest_local
    if cfg.output_dir is None:
        raise PrepError("ingest_local.output_dir is not set", "config",
                        "set ingest_local.output_dir or dataset_output_root")
    return Path(cfg.output_dir).resolve()


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_dirs(root)]


def shaping_args(cfg: Config) -> dict[str, Any]:
    """The settings that decide a shard's bytes (all of them go into every task's fingerprint)."""
    return {k: getattr(cfg, k) for k in (
        "resize_mode", "image_size", "resize_only_if_bigger", "upscale_interpolation",
        "downscale_interpolation", "reencode", "encode_format", "encode_quality", "min_image_size",
        "max_image_area", "max_aspect_ratio", "compute_hash", "missing_caption")}


def make_resizer(args: dict[str, Any]) -> Any:
    """img2dataset's Resizer for these settings (size filters are applied before it, by size_filter), or
    None when every image keeps its bytes (img2dataset's import alone takes seconds)."""
    if args["resize_mode"] == "no" and not args["reencode"]:
        return None
    load_img2dataset()  # sets the environment its albumentations import needs
    from img2dataset.resizer import Resizer

    try:
        return Resizer(image_size=args["image_size"], resize_mode=args["resize_mode"],
                       resize_only_if_bigger=args["resize_only_if_bigger"],
                       upscale_interpolation=args["upscale_interpolation"],
                       downscale_interpolation=args["downscale_interpolation"],
                       encode_quality=args["encode_quality"], encode_format=args["encode_format"])
    except ValueError as err:
        raise PrepError(f"img2dataset's resizer refuses these settings: {err}", "ingest_local",
                        "fix resize_mode / interpolation / encode_quality (png: 0-9)") from None


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    cfg: Config = root.ingest_local
    out = _dirs(root)
    if (cfg.input_dir is None) == (cfg.table is None):
        raise PrepError("set exactly one of ingest_local.input_dir (an image folder) and ingest_local.table "
                        "(a table of image paths)", "config ingest_local",
                        "set input_dir for a folder, or table for a parquet/CSV/JSONL of paths")
    extra_names = set(cfg.save_additional_columns or [])
    clash = sorted(extra_names & set(RESERVED_JSON))
    if clash:
        raise PrepError(f"save_additional_columns names {', '.join(clash)}, which each json holds already",
                        "ingest_local.save_additional_columns", "leave those columns out")
    args = shaping_args(cfg)
    make_resizer(args)
    parts: list[tuple[str, list[Found]]] = []
    notes: list[str] = []
    if cfg.input_dir is not None:
        folder = Path(cfg.input_dir).resolve()
        if out == folder or out in folder.parents:
            raise PrepError(f"output_dir {out} is input_dir {folder} or holds it",
                            "config ingest_local.output_dir",
                            "write the tars to another folder (one inside input_dir is fine: it is skipped)")
        found, notes = find_folder_images(cfg, folder, out)
        parts.append((folder.name or "images", found))
    else:
        if cfg.captions_file is not None:
            raise PrepError("captions_file is for an image folder; a table carries its captions in "
                            "caption_col", "config ingest_local.captions_file", "remove captions_file")
        seen: dict[str, str] = {}
        for table in table_files(str(cfg.table)):
            stem = shown_url(table).rsplit("/", 1)[-1].split(".", 1)[0]
            parts.append((stem, find_table_images(cfg, table, key_prefix(stem), seen)))
    tasks: list[Task] = []
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for part, found in parts:
        folder_name = key_prefix(part)
        if folder_name in names:
            raise PrepError(f"tables {names[folder_name]!r} and {part!r} make the same part folder "
                            f"{folder_name!r}", "ingest_local.table", "rename one of them")
        names[folder_name] = part
        for item in found:
            if item.drop is None:
                k = sample_key(item.rel)
                if k in keys:
                    raise PrepError(f"{item.rel!r} and {keys[k]!r} give the same key {k!r}", NAME,
                                    "rename one of the two files")
                keys[k] = item.rel
        per = cfg.number_sample_per_shard
        final = out / folder_name
        for s in range(0, len(found), per):
            name = shard_name(s // per, cfg.oom_shard_count)
            payload = {"part": folder_name, "shard": name, "final": str(final), "args": args,
                       "items": [f.to_json() for f in found[s: s + per]],
                       "notes": notes if not tasks else []}
            outputs = tuple(str(final / f"{name}{suffix}") for suffix in (".tar", ".parquet", "_stats.json"))
            tasks.append(Task(f"{folder_name}/{name}", payload, outputs, weight=len(payload["items"])))
    if not tasks:
        where = str(cfg.input_dir) if cfg.input_dir is not None else \
            f"ingest_local.table {shown_url(str(cfg.table))}"
        raise PrepError("no image found", where,
                        f"check the path; images are files ending in {', '.join(cfg.image_extensions)}"
                        if cfg.input_dir is not None else "check the table holds rows")
    return tasks


# ----------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What became of one image: its members (None when dropped) and its row in the shard's parquet."""

    key: str
    members: dict[str, MemberData] | None
    row: dict[str, Any]
    reason: str | None = None
    message: str | None = None
    reencoded: bool = False
    no_caption: bool = False
    source: tuple[str, int, int] | None = None  # (path, size, mtime_ns) of a file the tar copies from


def _read(src: str) -> tuple[bytes, tuple[str, int, int] | None]:
    """The file's bytes, and for a local file (path, size, mtime_ns) as read, so the tar can copy the kept
    original from the file instead of holding a shard's images in memory."""
    if "://" in src:
        import fsspec

        fs, path = fsspec.core.url_to_fs(src)
        return fs.cat_file(path), None  # one GET: its status reaches read_failure (open's HEAD hides it)
    with open(src, "rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), (src, st.st_size, st.st_mtime_ns)


def _wide_channels(img: Any, data: bytes) -> bool:
    """Whether the image has more than 8 bits a channel (16-bit gray or colour PNG, 16-bit TIFF):
    img2dataset's OpenCV reads those as uint16 and its 8-bit encode saturates them, a white picture."""
    png_depth = data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8
    return img.mode in WIDE_GRAY or png_depth > 8


def _upright_png(img: Any) -> bytes:
    """The image with its EXIF orientation applied, 8 bits a channel, as lossless PNG for the Resizer to
    read (img2dataset decodes with OpenCV's IMREAD_UNCHANGED, which ignores the tag, and its re-encode
    drops the tag and saturates wider channels)."""
    from PIL import ImageOps

    img = eight_bit(ImageOps.exif_transpose(img))
    if img.mode not in ("RGB", "RGBA", "L", "LA"):  # palette, CMYK, 16-bit: to what OpenCV reads as such
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def process(item: dict[str, Any], args: dict[str, Any], resizer: Any) -> Outcome:
    """Read, decode-check and (when asked) resize one image; never raises for a bad image."""
    from PIL import Image

    key = sample_key(item["rel"])
    row: dict[str, Any] = {"key": key, "path": item["path"], "caption": item.get("caption"),
                           "status": "success", "error_message": None, "width": None, "height": None,
                           "original_width": None, "original_height": None}
    if args["compute_hash"]:
        row[args["compute_hash"]] = None
    row.update(item.get("extra") or {})

    def dropped(reason: str, message: str) -> Outcome:
        row["status"], row["error_message"] = status_of(reason), f"{reason}: {message}"
        return Outcome(key, None, row, reason, message)

    if "drop" in item:
        return dropped(item["drop"], shown_url(item["src"]) or "the row has no path")
    caption = item.get("caption")
    if caption is None and "caption_file" in item:
        try:
            with open(item["caption_file"], "rb") as f:
                caption = f.read().decode("utf-8", "replace").strip()
        except OSError as err:
            return dropped("read_error", f"caption file {item['caption_file']}: {err.strerror or err}")
        row["caption"] = caption
    try:
        data, source = _read(item["src"])
    except Exception as err:  # fsspec's backends raise their own types (aiohttp's, botocore's, ...)
        return dropped(*read_failure(err, item["src"]))
    if args["compute_hash"]:
        row[args["compute_hash"]] = hashlib.new(args["compute_hash"], data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the full decode: truncated or corrupt data fails here, not in training
            fmt, (width, height) = img.format, img.size
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            shown = (height, width) if orientation in ROTATED else (width, height)
            resize = args["reencode"] or needs_resize(args["resize_mode"], args["image_size"],
                                                      args["resize_only_if_bigger"], *shown)
            redraw = orientation != 1 or _wide_channels(img, data)
            upright = _upright_png(img) if resize and redraw else data
    except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return dropped("decode_error", f"{type(err).__name__}: {_ADDRESS.sub('', str(err))}")
    ext = FORMAT_EXT.get(fmt or "")
    if ext is None:
        return dropped("unsupported_format", f"{fmt} is not one of {', '.join(sorted(FORMAT_EXT))}")
    why = size_filter(*shown, args)
    if why is not None:
        return dropped(why, f"{shown[0]}x{shown[1]}")
    if caption is None and args["missing_caption"] == "drop":
        return dropped("no_caption", "no caption found")
    row.update(original_width=shown[0], original_height=shown[1], width=width, height=height)
    out, reencoded = data, False
    if resize:
        got, w, h, _, _, resize_err = resizer(io.BytesIO(upright))
        if resize_err is not None:
            return dropped("resize_error", resize_err)
        out, ext, reencoded = got, args["encode_format"], True
        row.update(width=w, height=h)
    meta = {k: v for k, v in row.items() if k not in ("status", "error_message")}
    meta["caption"] = caption if caption is not None else ""
    if orientation != 1 and not reencoded:
        meta["exif_orientation"] = orientation  # the bytes still carry it; EXIF-aware decoders rotate
    image: MemberData = out
    if not reencoded and source is not None and source[1] == len(data):
        image = FileSlice(source[0], 0, len(data))
    members = {ext: image, "txt": meta["caption"].encode("utf-8"),
               "json": json.dumps(meta, indent=4, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    return Outcome(key, members, row, reencoded=reencoded, no_caption=caption is None,
                   source=source if isinstance(image, FileSlice) else None)


def check_unchanged(outcomes: list[Outcome], where: str) -> None:
    """Fail when a file the tar copied from changed after it was checked (its copy may not be the
    image that was decoded)."""
    for o in outcomes:
        if o.source is not None:
            path, size, mtime_ns = o.source
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise PrepError(f"{path} changed while it was being ingested", where,
                                "re-run when the files are no longer being written")


def _parquet(rows: list[dict[str, Any]], hash_name: str | None, extras: list[str]) -> Any:
    import pyarrow as pa

    string, integer = pa.string(), pa.int64()
    fields = [("key", string), ("path", string), ("caption", string), ("status", string),
              ("error_message", string), ("width", integer), ("height", integer),
              ("original_width", integer), ("original_height", integer)]
    fields += [(hash_name, string)] if hash_name else []
    columns = {n: pa.array([r.get(n) for r in rows], type=t) for n, t in fields}
    for name in extras:
        columns[name] = pa.array([r.get(name) for r in rows])
    return pa.table(columns)


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    p = task.payload
    args = p["args"]
    resizer = make_resizer(args)
    outcomes = sorted((process(it, args, resizer) for it in p["items"]), key=lambda o: o.key)
    final = Path(p["final"])
    tar, table, stats_path = (final / f"{p['shard']}{s}" for s in (".tar", ".parquet", "_stats.json"))
    info = write_shard(tar, [(o.key, o.members) for o in outcomes if o.members is not None])
    check_unchanged(outcomes, str(tar))
    cfg: Config = root.ingest_local
    write_parquet(_parquet([o.row for o in outcomes], args["compute_hash"],
                            list(cfg.save_additional_columns or [])), table)
    reasons = Counter(o.reason for o in outcomes if o.reason is not None)
    ok = len(outcomes) - sum(reasons.values())
    stats: dict[str, Any] = {
        "count": len(outcomes), "successes": ok,
        "failed_to_download": sum(n for r, n in reasons.items() if status_of(r) == "failed_to_download"),
        "failed_to_resize": sum(n for r, n in reasons.items() if status_of(r) == "failed_to_resize"),
        "status_dict": {**({"success": ok} if ok else {}), **dict(sorted(reasons.items()))}}
    write_text_atomic(stats_path, json.dumps(stats, indent=4))
    os.utime(stats_path)  # newer than the tar: reorganize_tar then trusts its count
    bad = sorted((o.row["path"], o.reason, o.message) for o in outcomes if o.reason is not None)
    notes = list(p["notes"]) + [f"{task.id}: dropped {path!r} ({why}): {msg}"
                                for path, why, msg in bad[:NOTES_NAMED]]
    if len(bad) > NOTES_NAMED:
        notes.append(f"{task.id}: … {len(bad) - NOTES_NAMED} more dropped (see {DROPPED_REPORT})")
    counts = {"samples_in": len(outcomes), "samples_out": ok, "shards": 1,
              "failed_to_download": stats["failed_to_download"],
              "failed_to_resize": stats["failed_to_resize"],
              "kept_original_bytes": sum(1 for o in outcomes if o.members is not None and not o.reencoded),
              "reencoded": sum(1 for o in outcomes if o.reencoded),
              "without_caption": sum(1 for o in outcomes if o.members is not None and o.no_caption)}
    return TaskResult(task.id, counts=counts, dropped=dict(reasons), notes=notes,
                      data={"dropped": [list(b) for b in bad]},
                      outputs={str(tar): {"bytes": info.bytes, "checksum": info.checksum}},
                      transient=sum(reasons[r] for r in TRANSIENT))


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    """Write the report of every dropped image, remove shard files an earlier plan left in this plan's
    part folders (the input shrank), name other part folders (never deleted: they may be another
    stage's), and sum up."""
    out = _dirs(root)
    planned = {f"{r.task_id}{suffix}" for r in results for suffix in (".tar", ".parquet", "_stats.json")}
    parts = {r.task_id.split("/", 1)[0] for r in results}
    stale = sorted(f for part in parts for f in (out / part).iterdir()
                   if f.is_file() and _SHARD_FILE.match(f.name) and f"{part}/{f.name}" not in planned)
    for f in stale:
        os.unlink(f)
    bad = sorted(tuple(b) for r in results for b in r.data.get("dropped", []))
    write_text_atomic(out / ".prep" / DROPPED_REPORT,
                      "".join(json.dumps({"path": p, "reason": r, "message": m}, ensure_ascii=False) + "\n"
                              for p, r, m in bad))
    total: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for r in results:
        total.update(r.counts)
        dropped.update(r.dropped)
    notes = [f"{total['samples_out']:,} of {total['samples_in']:,} image(s) written to {total['shards']} "
             f"shard(s) under {out} ({total['kept_original_bytes']:,} with their original bytes, "
             f"{total['reencoded']:,} re-encoded)"]
    if total["without_caption"]:
        notes.append(f"{total['without_caption']:,} image(s) have no caption (kept with an empty .txt; "
                     "missing_caption: drop drops them)")
    for reason, n in dropped.most_common():
        notes.append(f"dropped: {reason}: {n:,}")
    if bad:
        notes.append(f"every dropped image, by path and reason: {out / '.prep' / DROPPED_REPORT}")
    again = [r for r in results if r.transient]
    if again:
        notes.append(f"{sum(r.transient for r in again):,} image(s) in {len(again)} shard(s) failed for a "
                     f"reason that may pass ({', '.join(TRANSIENT)}): the next run reads those shards again")
    if stale:
        notes.append(f"removed {len(stale)} shard file(s) an earlier run wrote that this plan no longer has")
    notes += other_parts_warning(out, parts)
    if total["samples_out"] == 0:
        notes.append("WARNING: no image was kept; see the reasons above")
    return notes
