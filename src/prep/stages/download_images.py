"""download_images: fetch the images of every parquet part with img2dataset, one task per part.

Each task calls img2dataset's Python API on one part, into a staging folder
(`output_dir/.prep/img2dataset/<part>/`, where img2dataset's own `incremental` mode resumes a killed
run shard by shard). Each shard img2dataset finishes is published while the rest download, to
`output_dir/<part>/` as `NNNNN.tar` + `NNNNN.parquet` + `NNNNN_stats.json`, with keys prefixed by the
part (`<part>_<key>`, in the tar, its json and the parquet) so no two parts share a key; the tar is
rewritten sorted with fixed headers, so the same images give the same bytes. A shard img2dataset did
not finish fails the task (img2dataset itself only prints and returns). `--retry-failed` re-fetches
only the rows whose status is not `success` and merges the recovered images into their original
shards, keys unchanged.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.checksum import file_checksum
from prep.formats.names import split_key
from prep.formats.tar import iter_members, scan_tar
from prep.formats.tar_write import FileSlice, write_shard
from prep.formats.urls import redact_urls_in, scrub_url
from prep.stages.base import RunOptions, StageConfig, Task, TaskResult
from prep.stages.parquet_parts import (
    NOT_A_PART,
    check_columns,
    key_prefix,
    load_img2dataset,
    other_parts_warning,
    reading_parquet,
    shard_name,
    write_parquet,
)

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "download_images"
TITLE = "download images with img2dataset into uneven tars (jpg/txt/json), one task per parquet part"
VERSION = 1
TORCHRUN_RANKS = False
STAGING = ".prep/img2dataset"
RESERVED = ("url_list", "output_folder", "input_format", "output_format")  # prep decides these
_ARG_OF = {"download_num_processes": "processes_count", "download_num_threads": "thread_count"}


class Config(StageConfig):
    input_dir: Path | None = Field(None, description="parquet parts (default: download_parquet.output_dir)")
    output_dir: Path | None = Field(None, description="raw tars (default: <root>/tarfiles_raw)")
    parquet_pattern: str = Field("*.parquet", description="which files of input_dir are parts "
                                 "(one task each)")
    url_col: str = Field("URL", description="column holding image URLs (LAION: URL)")
    caption_col: str | None = Field("TEXT", description="column holding captions (LAION: TEXT); "
                                    "null for none")
    download_num_processes: int = Field(-1, ge=-1, description="img2dataset processes per task; -1: "
                                        "$SLURM_CPUS_PER_TASK or every CPU")
    download_num_threads: int = Field(64, ge=1, description="download threads per process")
    timeout: int = Field(10, ge=1, description="seconds before one image request gives up")
    retries: int = Field(2, ge=0, description="extra attempts per failed image request")
    image_size: int = Field(256, ge=1, description="target size when resize_mode is not 'no'")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "no", description="img2dataset resize mode; 'no' keeps original images (crop later, per model)")
    resize_only_if_bigger: bool = Field(False, description="only downscale, never upscale")
    upscale_interpolation: str = Field("lanczos", description="OpenCV interpolation for upscaling")
    downscale_interpolation: str = Field("area", description="OpenCV interpolation for downscaling")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="image format written to "
                                                         "the tars")
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality (png: compression 0-9)")
    skip_reencode: bool = Field(False, description="keep the original bytes when no resize is needed")
    disable_all_reencoding: bool = Field(False, description="never decode/re-encode (no size filters apply)")
    min_image_size: int = Field(0, ge=0, description="drop images whose smaller side is below this")
    max_image_area: float | None = Field(None, gt=0, description="drop images with more pixels than this "
                                         "(null: no limit)")
    max_aspect_ratio: float | None = Field(None, gt=0, description="drop images more elongated than this "
                                           "(null: no limit)")
    number_sample_per_shard: int = Field(1000, ge=1, description="rows per img2dataset shard (upper bound "
                                         "with balance_shards)")
    balance_shards: bool = Field(True, description="spread a part's rows evenly over its shards instead of "
                                 "leaving one short last shard")
    save_additional_columns: list[str] | None = Field(None, description="extra parquet columns copied into "
                                                      "each sample's json")
    bbox_col: str | None = Field(None, description="column of boxes to blur (img2dataset's bbox blurring)")
    extract_exif: bool = Field(True, description="store EXIF in each sample's json")
    compute_hash: Literal["md5", "sha256", "sha512"] | None = Field("sha256", description="hash of each "
                                                                    "image stored in its json")
    verify_hash: list[str] | None = Field(None, description="[column, md5|sha256|sha512]: drop images whose "
                                          "hash differs")
    disallowed_header_directives: list[str] | None = Field(None, description="X-Robots-Tag directives that "
                                                           "forbid use (null: noai, noimageai, noindex, "
                                                           "noimageindex; []: ignore the header)")
    user_agent_token: str | None = Field(None, description="token added to the User-Agent and matched in "
                                         "X-Robots-Tag")
    incremental_mode: Literal["incremental", "overwrite"] = Field("incremental", description="incremental: "
                                                                  "resume shard by shard; overwrite: redo a "
                                                                  "part from scratch when its task runs")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = Field("multiprocessing", description="how "
                                                                      "img2dataset spreads shards")
    subjob_size: int = Field(1000, ge=1, description="shards per pyspark job")
    max_shard_retry: int = Field(1, ge=0, description="times img2dataset re-runs a shard that raised")
    oom_shard_count: int = Field(5, ge=1, description="digits in shard names (00000.tar)")
    enable_wandb: bool = Field(False, description="log img2dataset's progress to Weights & Biases")
    wandb_project: str = Field("img2dataset", description="W&B project when enable_wandb")
    img2dataset_additional_arguments: dict[str, Any] = Field(default_factory=dict, description="any other "
                                                             "img2dataset.download argument (NeMo's key)")

    @field_validator("verify_hash")
    @classmethod
    def _pair(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) != 2 or v[1] not in ("md5", "sha256", "sha512")):
            raise ValueError("verify_hash is [column, md5|sha256|sha512]")
        return v

    def required_columns(self) -> list[str]:
        """The table columns a download needs (url, caption, saved extras, bbox, hash)."""
        cols = [self.url_col] + ([self.caption_col] if self.caption_col else [])
        cols += list(self.save_additional_columns or []) + ([self.bbox_col] if self.bbox_col else [])
        return cols + ([self.verify_hash[0]] if self.verify_hash else [])


# --------------------------------------------------------------------------------------------- decisions


def shard_layout(rows: int, per_shard: int, balance: bool) -> tuple[int, int]:
    """(shards, rows per shard) for img2dataset: balanced, k shards of ceil(rows/k) rows each."""
    if rows == 0:
        return 0, per_shard
    shards = math.ceil(rows / per_shard)
    return (shards, math.ceil(rows / shards)) if balance else (shards, per_shard)


def row_of(i2d_key: str, per_shard: int) -> int:
    """The part row an img2dataset key stands for (its key is shard * 10**ceil(log10(n)) + index)."""
    shard, index = divmod(int(i2d_key), 10 ** math.ceil(math.log10(per_shard)))
    return shard * per_shard + index


_REASONS: list[tuple[str, str]] = [
    ("timed out", "timeout"), ("timeout", "timeout"), ("image decoding error", "decode_error"),
    ("cannot identify image", "decode_error"), ("x-robots-tag", "disallowed_by_x_robots_tag"),
    ("image too small", "too_small"), ("aspect ratio too large", "aspect_ratio_too_large"),
    ("image area too large", "area_too_large"), ("hash mismatch", "hash_mismatch"),
    ("certificate", "ssl_error"), ("ssl", "ssl_error"), ("connection refused", "connection_refused"),
    ("connection reset", "connection_reset"), ("name or service not known", "dns_error"),
    ("nodename nor servname", "dns_error"), ("remote end closed", "connection_closed"),
    ("redirect", "too_many_redirects"),
    # img2dataset's message for a null URL (it shows as 'None') and an empty one
    ("unknown url type: 'none'", "url_missing"), ("unknown url type: ''", "url_missing"),
    ("unknown url type", "bad_url"),
]


def reason_of(message: str) -> str:
    """A stable reason slug for one of img2dataset's status messages (404 -> http_404, ...)."""
    m = message.lower()
    http = re.search(r"http error (\d{3})", m)
    if http:
        return f"http_{http.group(1)}"
    return next((slug for needle, slug in _REASONS if needle in m), "other")


def reasons(status_dict: dict[str, int]) -> Counter[str]:
    out: Counter[str] = Counter()
    for message, n in status_dict.items():
        if message != "success":
            out[reason_of(message)] += n
    return out


def resolve_processes(n: int) -> int:
    if n > 0:
        return n
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)


def check_distributor(name: str) -> None:
    """img2dataset silently does nothing when ray is missing (and pyspark fails late): fail up front."""
    module = {"ray": "ray", "pyspark": "pyspark"}.get(name)
    if module and importlib.util.find_spec(module) is None:
        raise PrepError(f"distributor {name!r} needs the {module} package, which is not installed",
                        "download_images.distributor",
                        f"pip install {module} (or use distributor: multiprocessing)")


def img2dataset_args(cfg: Config) -> dict[str, Any]:
    """Every img2dataset.download argument prep passes, from the config (plus the additional ones)."""
    args: dict[str, Any] = {
        "processes_count": cfg.download_num_processes, "thread_count": cfg.download_num_threads,
        "timeout": cfg.timeout, "retries": cfg.retries, "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode, "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "upscale_interpolation": cfg.upscale_interpolation,
        "downscale_interpolation": cfg.downscale_interpolation,
        "encode_format": cfg.encode_format, "encode_quality": cfg.encode_quality,
        "skip_reencode": cfg.skip_reencode, "disable_all_reencoding": cfg.disable_all_reencoding,
        "min_image_size": cfg.min_image_size, "max_image_area": cfg.max_image_area,
        "max_aspect_ratio": cfg.max_aspect_ratio, "url_col": cfg.url_col, "caption_col": cfg.caption_col,
        "save_additional_columns": cfg.save_additional_columns, "bbox_col": cfg.bbox_col,
        "extract_exif": cfg.extract_exif, "compute_hash": cfg.compute_hash, "verify_hash": cfg.verify_hash,
        "disallowed_header_directives": cfg.disallowed_header_directives,
        "user_agent_token": cfg.user_agent_token, "incremental_mode": cfg.incremental_mode,
        "distributor": cfg.distributor, "subjob_size": cfg.subjob_size,
        "max_shard_retry": cfg.max_shard_retry,
        "oom_shard_count": cfg.oom_shard_count, "enable_wandb": cfg.enable_wandb,
        "wandb_project": cfg.wandb_project,
    }
    extra = cfg.img2dataset_additional_arguments
    if extra:
        bad = [k for k in extra if k in RESERVED]
        if bad:
            raise PrepError(f"img2dataset_additional_arguments sets {', '.join(bad)}, which prep decides",
                            "download_images.img2dataset_additional_arguments",
                            "use download_images.input_dir / output_dir; the formats are always "
                            "parquet in, webdataset out")
        known = _download_params()
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise PrepError(f"img2dataset.download has no argument {', '.join(unknown)}",
                            "download_images.img2dataset_additional_arguments",
                            f"use one of: {', '.join(sorted(k for k in known if k not in RESERVED))}")
        args.update(extra)
    return args


def _download_params() -> set[str]:
    import inspect

    return set(inspect.signature(load_img2dataset().download).parameters)


# ---------------------------------------------------------------------------------------------- planning


def _dirs(root: PrepConfig) -> tuple[Path, Path]:
    cfg: Config = root.download_images
    if cfg.input_dir is None or cfg.output_dir is None:
        raise PrepError("download_images.input_dir/output_dir is not set", "config",
                        "set them, or dataset_output_root (they default to <root>/parquet and "
                        "<root>/tarfiles_raw)")
    return Path(cfg.input_dir), Path(cfg.output_dir)


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_dirs(root)[1]]


def find_parts(folder: Path, pattern: str) -> list[Path]:
    if not folder.is_dir():
        raise PrepError("input folder does not exist", str(folder),
                        "run download_parquet first or set download_images.input_dir")
    parts = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not parts:
        raise PrepError(f"no parquet part matches {pattern!r}", str(folder),
                        "run download_parquet first, or fix download_images.input_dir / parquet_pattern")
    return parts


def _failed_now(final_dir: Path) -> int:
    total = 0
    for stats in final_dir.glob("*_stats.json"):
        doc = _read_stats(stats)
        total += doc["count"] - doc["successes"]
    return total


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    import pyarrow.parquet as pq

    cfg: Config = root.download_images
    inp, out = _dirs(root)
    check_distributor(cfg.distributor)
    explicit = {_ARG_OF.get(f, f) for f in cfg.model_fields_set}
    overlap = sorted(set(cfg.img2dataset_additional_arguments) & explicit)
    if overlap:
        raise PrepError(f"{', '.join(overlap)} set both as a key and in img2dataset_additional_arguments",
                        "download_images", "keep one of them")
    args = img2dataset_args(cfg)
    prefixes: dict[str, str] = {}
    tasks = []
    parts = find_parts(inp, cfg.parquet_pattern)
    for path in parts:
        with reading_parquet(path, NOT_A_PART):
            meta = pq.read_metadata(path)
        check_columns(meta.schema.to_arrow_schema().names, cfg.required_columns(), str(path))
        part = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.stem
        prefix = key_prefix(part)
        if prefix in prefixes:
            raise PrepError(f"parts {prefixes[prefix]!r} and {part!r} give the same key prefix {prefix!r}",
                            str(inp), "rename one of the parts")
        prefixes[prefix] = part
        shards, per = shard_layout(meta.num_rows, cfg.number_sample_per_shard, cfg.balance_shards)
        if shards == 0:  # kept as a task, so the summary names it
            tasks.append(Task(part, {"part": part, "path": str(path.resolve()), "shards": 0}))
            continue
        final = (out / part).resolve()
        digits = args["oom_shard_count"]
        outputs = tuple(str(final / f"{shard_name(s, digits)}{suffix}") for s in range(shards)
                        for suffix in (".tar", ".parquet", "_stats.json"))
        st = path.stat()
        payload = {"part": part, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "rows": meta.num_rows, "shards": shards, "per_shard": per, "prefix": prefix,
                   "final": str(final), "staging": str((out / STAGING / part).resolve()), "args": args}
        if opts.retry_failed:
            payload["retry_failed"] = {"failed": _failed_now(final)}
        tasks.append(Task(part, payload, outputs, weight=meta.num_rows))
    if all(t.payload["shards"] == 0 for t in tasks):
        raise PrepError(f"every parquet part is empty (0 rows), e.g. {parts[0].name}", str(inp),
                        "check the parquet source (download_parquet splits each file into "
                        "parquet_subpartitions parts: fewer parts than rows leaves none empty)")
    return tasks


# ----------------------------------------------------------------------------------------------- running


_BAR = re.compile(r"(?:it/s|s/it)\]|\d+it \[")  # tqdm's "0it [00:00, ?it/s]" and "1it [00:33, 33.54s/it]"


class _BarsTo(io.TextIOBase):
    """A stderr that sends progress bars (tqdm's carriage-return lines and the newline that ends them)
    to img2dataset's log and lets everything else, its warnings, through to prep's stderr."""

    def __init__(self, log: io.TextIOBase, stream: Any) -> None:
        self.log, self.stream, self.in_bar = log, stream, False

    def write(self, s: str) -> int:
        self.in_bar = "\r" in s or bool(_BAR.search(s)) or (self.in_bar and not s.strip())
        (self.log if self.in_bar else self.stream).write(s)
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()


@contextmanager
def _stdout_to(log: Path) -> Iterator[None]:
    """img2dataset and its processes print progress to stdout, and its tqdm bar goes to stderr: both to
    img2dataset's log, out of prep's own progress and `--json` output; its warnings still reach stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
    try:
        with open(log, "a", encoding="utf-8") as text, redirect_stderr(_BarsTo(text, sys.stderr)):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def call_img2dataset(url_list: Path, output_folder: Path, args: dict[str, Any], where: str) -> None:
    """One img2dataset.download call; its exceptions and its SIGINT exit become a PrepError."""
    kwargs = dict(args)
    kwargs["processes_count"] = resolve_processes(kwargs["processes_count"])
    for k in ("max_image_area", "max_aspect_ratio"):
        if kwargs.get(k) is None:
            kwargs[k] = float("inf")
    kwargs.update(url_list=str(url_list), output_folder=str(output_folder), input_format="parquet",
                  output_format="webdataset")
    i2d = load_img2dataset()
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGINT) if main else None
    log = output_folder.parent / f"{output_folder.name}.log"
    try:
        with _stdout_to(log):
            i2d.download(**kwargs)
    except SystemExit:  # img2dataset's SIGINT handler exits 0; that is no success
        raise PrepError("img2dataset was interrupted", where, "re-run; finished shards are kept") from None
    except Exception as err:
        raise PrepError(f"img2dataset failed: {type(err).__name__}: {redact_urls_in(str(err))}", where,
                        f"see {log}; fix the cause and re-run (finished shards are kept)") from None
    finally:
        _redact_file(log)
        if main and old is not None:
            signal.signal(signal.SIGINT, old)


def _redact_file(path: Path) -> None:
    """Rewrite a text file img2dataset wrote (its log) with every URL that holds a secret redacted;
    untouched when there is none."""
    if not path.is_file():
        return
    text = path.read_text("utf-8", errors="replace")
    if (clean := redact_urls_in(text)) != text:
        write_text_atomic(path, clean)


def _scrubbed_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """img2dataset's shard stats with the URLs its error messages quote redacted (status_dict's keys
    are the messages)."""
    counts: Counter[str] = Counter()
    for message, n in (stats.get("status_dict") or {}).items():
        counts[redact_urls_in(message)] += n
    return {**stats, "status_dict": dict(counts)} if "status_dict" in stats else stats


def _scrubbed_table(table: Any) -> Any:
    """img2dataset's shard parquet as prep records it: `url` without credentials (`scrub_url`), error
    messages with quoted URLs redacted."""
    import pyarrow as pa

    for name, clean in (("url", scrub_url), ("error_message", redact_urls_in)):
        if name in table.column_names:
            values = table[name].to_pylist()
            fixed = [clean(v) if isinstance(v, str) else v for v in values]
            if fixed != values:
                field = table.schema.field(i := table.schema.get_field_index(name))
                table = table.set_column(i, field, pa.array(fixed, field.type))
    return table


class StatsUnreadable(PrepError):
    """img2dataset's `NNNNN_stats.json` is not JSON: cut, or (staged) still being written."""


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StatsUnreadable(f"img2dataset's shard stats are not JSON ({err})", str(path),
                              "delete the shard's .tar, .parquet and _stats.json and re-run: it is fetched "
                              "again") from None


def _cut(stats: Path) -> bool:
    """Whether a staged stats file is there but not whole (img2dataset killed while writing it)."""
    if not stats.exists():
        return False
    try:
        _read_stats(stats)
    except StatsUnreadable:
        return True
    return False


def _prefixed(table: Any, prefix: str) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pc.binary_join_element_wise(pa.scalar(f"{prefix}_"), table["key"], "")
    return table.set_column(table.schema.get_field_index("key"), "key", keys).sort_by("key")


def _json_member(data: bytes, old_key: str, key: str, drop: tuple[str, ...] = ()) -> bytes:
    """The sample's json with its new key and its `url` without credentials (`scrub_url`).
    img2dataset writes `"key": "<digits>"` once (a caption cannot hold an unescaped quote), so a byte
    replace does it when the URL has nothing to hide; anything else is re-written."""
    meta = json.loads(data)
    url = meta.get("url")
    needle = b'"key": "%s"' % old_key.encode()
    if not drop and data.count(needle) == 1 and (not isinstance(url, str) or scrub_url(url) == url):
        return data.replace(needle, b'"key": "%s"' % key.encode())
    meta["key"] = key
    if isinstance(url, str):
        meta["url"] = scrub_url(url)
    for k in drop:
        meta.pop(k, None)
    return json.dumps(meta, indent=4).encode()


def read_i2d_tar(tar: Path, rename: dict[str, str] | None = None, prefix: str = "",
                 drop: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Samples of an img2dataset tar in one sequential read: image and caption stay in the file
    (copied later), the json is rewritten with the new key (`rename[key]`, else `<prefix>_<key>`)."""
    samples: list[tuple[str, dict[str, Any]]] = []
    with open(tar, "rb", buffering=1 << 20) as f:
        for member, data in iter_members(f, str(tar), read_data=True):
            parts = split_key(member.name)
            if parts is None:
                continue
            old, ext = parts
            key = rename[old] if rename is not None else f"{prefix}_{old}"
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            members = samples[-1][1]
            if ext == "json" and data is not None:
                members[ext] = _json_member(data, old, key, drop)
            else:
                members[ext] = FileSlice(str(tar), member.data_offset, member.size)
    return samples


def publish_shard(staging: Path, final: Path, name: str, prefix: str) -> dict[str, Any]:
    """Move one finished img2dataset shard to `final` with prefixed keys; returns its tar's facts.

    Order: tar, parquet, stats (stats last marks the shard published), then the staging tar and
    parquet go; the staging stats stay so img2dataset's incremental mode skips the shard next time.
    """
    import pyarrow.parquet as pq

    tar, table_path = staging / f"{name}.tar", staging / f"{name}.parquet"
    stats_path = staging / f"{name}_stats.json"
    stats = _read_stats(stats_path)
    samples = read_i2d_tar(tar, prefix=prefix)
    if len(samples) != stats["successes"]:
        raise PrepError(f"img2dataset's tar holds {len(samples)} samples but its stats say "
                        f"{stats['successes']} succeeded", str(tar), "delete the staging shard and re-run")
    final.mkdir(parents=True, exist_ok=True)
    info = write_shard(final / f"{name}.tar", samples)
    write_parquet(_prefixed(_scrubbed_table(pq.read_table(table_path)), prefix), final / f"{name}.parquet")
    stats = _scrubbed_stats(stats)
    write_text_atomic(final / f"{name}_stats.json", json.dumps(stats, indent=4))
    write_text_atomic(stats_path, json.dumps(stats, indent=4))  # kept for img2dataset: no secret either
    tar.unlink()
    table_path.unlink()
    return {"bytes": info.bytes, "checksum": info.checksum}


def _published(final: Path, name: str) -> bool:
    return all((final / f"{name}{s}").is_file() for s in (".tar", ".parquet", "_stats.json"))


# img2dataset arguments that change what a shard holds; the others (processes, threads, timeout, ...)
# may change between a killed run and its resume without invalidating finished shards
_SHAPING = ("image_size", "resize_mode", "resize_only_if_bigger", "upscale_interpolation",
            "downscale_interpolation", "encode_format", "encode_quality", "skip_reencode",
            "disable_all_reencoding", "min_image_size", "max_image_area", "max_aspect_ratio", "url_col",
            "caption_col", "save_additional_columns", "bbox_col", "extract_exif", "compute_hash",
            "verify_hash", "oom_shard_count")
IDENTITY = ".prep-part.json"


def part_identity(p: dict[str, Any], part_checksum: str) -> dict[str, Any]:
    """What published shards were made from: the part's bytes, its layout and the shaping arguments
    (content, not mtime, so re-writing identical parts costs no re-download)."""
    return {"checksum": part_checksum, "rows": p["rows"], "shards": p["shards"], "per_shard": p["per_shard"],
            "prefix": p["prefix"], "args": {k: p["args"].get(k) for k in _SHAPING}}


def _start_fresh_if_stale(p: dict[str, Any]) -> bool:
    """Remove a part's shards (published and staged) when they were made from another input or with
    other shaping arguments, or when `incremental_mode: overwrite`; returns whether it did."""
    final, staging = Path(p["final"]), Path(p["staging"])
    ident = json.dumps(part_identity(p, file_checksum(p["path"])), sort_keys=True)
    stored = final / IDENTITY
    old = stored.read_text("utf-8") if stored.exists() else None
    stale = p["args"]["incremental_mode"] == "overwrite" or (old != ident and (old is not None or (
        final.exists() and any(final.iterdir())) or staging.exists()))
    if stale:
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    if stale or old != ident:
        write_text_atomic(stored, ident)
    return stale


class _Publisher(threading.Thread):
    """Publishes each shard as soon as img2dataset has written its stats (it writes them last), so
    rewriting tars overlaps with downloading instead of following it."""

    def __init__(self, staging: Path, final: Path, todo: list[str], prefix: str) -> None:
        super().__init__(name="prep-publish", daemon=True)
        self.staging, self.final, self.prefix = staging, final, prefix
        self.pending = set(todo)
        self.published: list[str] = []
        self.facts: dict[str, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def sweep(self, last: bool) -> None:
        for n in sorted(self.pending):
            stats = self.staging / f"{n}_stats.json"
            if not (stats.exists() and (self.staging / f"{n}.tar").exists()):
                continue
            if not last:
                try:
                    _read_stats(stats)
                except StatsUnreadable:  # img2dataset is still writing it
                    continue
            self.facts[str(self.final / f"{n}.tar")] = publish_shard(self.staging, self.final, n, self.prefix)
            self.published.append(n)
            self.pending.discard(n)

    def run(self) -> None:
        try:
            while not self._stop_event.wait(0.2):
                self.sweep(last=False)
        except BaseException as err:  # surfaced by finish()
            self.error = err

    def finish(self) -> None:
        """Stop polling, publish whatever is left, and re-raise a publishing error."""
        self._stop_event.set()
        self.join()
        if self.error is not None:
            raise self.error
        self.sweep(last=True)


def _download_part(p: dict[str, Any], where: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Run img2dataset for the shards not yet published and publish what it finished.

    Returns (shards published now, tar facts) and raises when a shard stays unfinished.
    """
    final, staging = Path(p["final"]), Path(p["staging"])
    args = p["args"]
    names = [shard_name(s, args["oom_shard_count"]) for s in range(p["shards"])]
    todo = [n for n in names if not _published(final, n)]
    if not todo:
        return [], {}
    staging.mkdir(parents=True, exist_ok=True)
    for n in names:  # img2dataset's incremental mode skips a shard when its stats file is there
        if n not in todo and not (staging / f"{n}_stats.json").exists():
            shutil.copyfile(final / f"{n}_stats.json", staging / f"{n}_stats.json")
        elif n in todo and (not (staging / f"{n}.tar").exists() or _cut(staging / f"{n}_stats.json")):
            # published once, then lost from final; or a kill cut img2dataset's write of the stats (it
            # opens the file, then fills it): fetch it again, not skip it forever nor fail on it
            (staging / f"{n}_stats.json").unlink(missing_ok=True)
    publisher = _Publisher(staging, final, todo, p["prefix"])
    publisher.start()
    try:
        call_img2dataset(Path(p["path"]), staging, {**args, "number_sample_per_shard": p["per_shard"],
                                                    "incremental_mode": "incremental"}, where)
    finally:
        publisher.finish()
    published, facts = publisher.published, publisher.facts
    unfinished = sorted(publisher.pending)
    if unfinished:
        raise PrepError(f"img2dataset did not finish shard(s) {', '.join(unfinished)} of {len(names)} "
                        f"(published {len(published)})", where,
                        f"see {staging}.log for its errors, then re-run: finished shards are kept")
    return published, facts


def _retry_failed(p: dict[str, Any], where: str) -> tuple[int, int, dict[str, dict[str, Any]]]:
    """Re-fetch only the rows whose status is not success; merge what comes back, keys unchanged.

    Returns (rows retried, images recovered, tar facts). Safe to kill: the tar is rewritten first and
    a re-run never adds a key the tar already holds.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    final, staging = Path(p["final"]), Path(p["staging"])
    args, prefix, per = p["args"], p["prefix"], p["per_shard"]
    names = [shard_name(s, args["oom_shard_count"]) for s in range(p["shards"])]
    failed_keys: list[str] = []
    shard_of: dict[str, str] = {}
    for n in names:
        t = pq.read_table(final / f"{n}.parquet", columns=["key", "status"])
        for key in t.filter(pc.not_equal(t["status"], "success"))["key"].to_pylist():
            failed_keys.append(key)
            shard_of[key] = n
    if not failed_keys:
        return 0, 0, {}
    rows = [row_of(k[len(prefix) + 1:], per) for k in failed_keys]
    source = pq.read_table(p["path"]).take(pa.array(rows, pa.int64()))
    source = source.append_column("prep_key", pa.array(failed_keys, pa.string()))
    work = staging.parent / f"{staging.name}.retry"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_parquet(source, work / "input.parquet")
    extra = [*(args.get("save_additional_columns") or []), "prep_key"]
    call_img2dataset(work / "input.parquet", work / "out",
                     {**args, "save_additional_columns": extra, "number_sample_per_shard": max(1, len(rows)),
                      "incremental_mode": "incremental"}, where)  # a fresh folder; img2dataset's
    # "overwrite" deletes the _tmp folder it has just made
    got_rows: dict[str, dict[str, Any]] = {}
    got_samples: dict[str, dict[str, Any]] = {}
    out = work / "out"
    for stats in sorted(out.glob("*_stats.json")):
        n = stats.name.split("_")[0]
        t = _scrubbed_table(pq.read_table(out / f"{n}.parquet"))
        key_of = dict(zip(t["key"].to_pylist(), t["prep_key"].to_pylist(), strict=True))
        for row in t.to_pylist():
            got_rows[row["prep_key"]] = row
        for key, members in read_i2d_tar(out / f"{n}.tar", rename=key_of, drop=("prep_key",)):
            got_samples[key] = members
    facts: dict[str, dict[str, Any]] = {}
    recovered = 0
    for n in sorted({shard_of[k] for k in got_rows}):
        keys = {k for k in got_rows if shard_of[k] == n}
        tar = final / f"{n}.tar"
        scan = scan_tar(tar)
        have = {s.key for s in scan.samples}
        samples = [(s.key, {ext: FileSlice(str(tar), m.data_offset, m.size) for ext, m in s.members.items()})
                   for s in scan.samples]
        samples += [(k, got_samples[k]) for k in sorted(keys) if k in got_samples and k not in have]
        info = write_shard(tar, samples)
        facts[str(tar)] = {"bytes": info.bytes, "checksum": info.checksum}
        table = pq.read_table(final / f"{n}.parquet")
        kept = table.filter(pc.invert(pc.is_in(table["key"], pa.array(sorted(keys), pa.string()))))
        new = [{**{c: got_rows[k].get(c) for c in table.column_names}, "key": k} for k in sorted(keys)]
        merged = pa.concat_tables([kept, pa.Table.from_pylist(new, schema=table.schema)]).sort_by("key")
        write_parquet(merged, final / f"{n}.parquet")
        old = _read_stats(final / f"{n}_stats.json")
        write_text_atomic(final / f"{n}_stats.json", json.dumps(_restat(merged, old), indent=4))
        recovered += sum(1 for k in keys if got_rows[k]["status"] == "success")
    shutil.rmtree(work, ignore_errors=True)
    return len(failed_keys), recovered, facts


def _restat(table: Any, old: dict[str, Any]) -> dict[str, Any]:
    """img2dataset's stats for a shard, recounted from its parquet after a retry merged into it."""
    status = Counter(table["status"].to_pylist())
    pairs = zip(table["error_message"].to_pylist(), table["status"].to_pylist(), strict=True)
    messages = Counter(m for m, s in pairs if s != "success" and m is not None)
    return {**old, "count": table.num_rows, "successes": status["success"],
            "failed_to_download": status["failed_to_download"],
            "failed_to_resize": status["failed_to_resize"],
            "status_dict": {**({"success": status["success"]} if status["success"] else {}), **messages},
            "retried": old.get("retried", 0) + 1}


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    p = task.payload
    if p["shards"] == 0:
        return TaskResult(task.id, counts={"parts_empty": 1},
                          notes=[f"{p['path']}: the part is empty (0 rows); nothing to download from it"])
    where = f"download_images part {p['part']} ({p['path']})"
    restarted = _start_fresh_if_stale(p)
    published, facts = _download_part(p, where)
    retried = recovered = 0
    if "retry_failed" in p:
        retried, recovered, more = _retry_failed(p, where)
        facts.update(more)
    final = Path(p["final"])
    names = [shard_name(s, p["args"]["oom_shard_count"]) for s in range(p["shards"])]
    totals: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    shards: dict[str, int] = {}
    fetched_now = 0
    spans: list[tuple[float, float]] = []
    for n in names:
        st = _read_stats(final / f"{n}_stats.json")
        totals.update({"samples_in": st["count"], "samples_out": st["successes"]})  # failures: by reason
        dropped.update(reasons(st["status_dict"]))
        shards[f"{n}.tar"] = st["successes"]
        if n in published:
            fetched_now += st["successes"]
            if "start_time" in st and "end_time" in st:
                spans.append((float(st["start_time"]), float(st["end_time"])))
    if sum(dropped.values()) != totals["samples_in"] - totals["samples_out"]:
        dropped["other"] += totals["samples_in"] - totals["samples_out"] - sum(dropped.values())
    counts = {**totals, "shards": len(names), "shards_downloaded_now": len(published),
              "images_fetched_now": fetched_now + recovered, "retried": retried, "recovered": recovered}
    notes = [f"{p['part']}: earlier shards came from another input or other settings; downloaded again"
             ] if restarted and p["args"]["incremental_mode"] != "overwrite" else []
    return TaskResult(task.id, counts=counts, dropped=dict(dropped), notes=notes,
                      data={"part": p["part"], "shards": shards, "download_seconds": _span(spans)},
                      outputs=facts)


def _span(spans: list[tuple[float, float]]) -> float:
    """Seconds from the first shard's start to the last shard's end (img2dataset's own clock)."""
    return round(max(e for _, e in spans) - min(s for s, _ in spans), 3) if spans else 0.0


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.counts)
    tried, ok = total["samples_in"], total["samples_out"]
    notes = [f"{len(results)} part(s): {ok:,} of {tried:,} images downloaded "
             f"(success rate {100 * ok / tried if tried else 0:.1f}%), {total['shards']} shard(s) under "
             f"{_dirs(root)[1]}"]
    run_now = [r for r in results if r.status == "done"]
    fetched = sum(r.counts.get("images_fetched_now", 0) for r in run_now)
    if run_now:
        wall = sum(r.seconds for r in run_now) / max(1, min(opts.workers, len(run_now)))
        rate = fetched / wall if wall > 0 else 0.0
        span = sum(r.data.get("download_seconds", 0.0) for r in run_now) / max(1, min(opts.workers,
                                                                                     len(run_now)))
        phase = f"; {fetched / span:,.1f} images/s while img2dataset downloaded" if span > 0 else ""
        notes.append(f"fetched {fetched:,} image(s) in this run: {rate:,.1f} images/s over the tasks' time "
                     f"(process start-up included){phase}")
    if total["retried"]:
        notes.append(f"--retry-failed: re-fetched {total['retried']:,} failed row(s), "
                     f"recovered {total['recovered']:,}")
    if ok == 0 and tried:
        notes.append("WARNING: no image was downloaded; check url_col, the network and the failure "
                     "reasons (the dropped rows)")
    return notes + other_parts_warning(_dirs(root)[1], {r.task_id for r in results})
