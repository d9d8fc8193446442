"""precache_encodings: run frozen encoders (VAE, CLIP, T5) over shards and store their outputs.

Work is split by shard, never by sample: one task per shard (or per `shards_per_task` shards), so
every shard is read by exactly one process. Tasks are sliced across Slurm array jobs
(`--task-index/--num-tasks`), Ray, and `torchrun` ranks (RANK/WORLD_SIZE, each rank on
cuda:LOCAL_RANK). The whole encoder list is validated in `prepare()`, before any shard is read (and
only when some task has work: a re-run with every shard done imports no model).

Outputs: `<output_dir>/<relative name of the input shard>` holding `KEY.<key>.npy` next to the
source members (`keep_source: true`), or only the `.npy` members (`keep_source: false`, joined later
by merge_source_tar), each with its `.idx`; `finalize` writes `manifest.json` with every field's
dtype and shape and every encoder's identity and settings. Resumable per shard.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from prep.encoders.spec import EncoderConfig
from prep.errors import PrepError
from prep.formats.atomic import write_text_atomic
from prep.formats.index import index_path
from prep.formats.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from prep.stages.base import (
    RunOptions,
    StageConfig,
    Task,
    TaskResult,
    local_gpu_index,
    marker_dir,
    marker_file,
    recorded_marker_file,
    torchrun_slice,
    unplanned_shards_warning,
)

if TYPE_CHECKING:
    from prep.config import PrepConfig

NAME = "precache_encodings"
TITLE = "encode images/captions with frozen encoders (VAE, CLIP, T5) into KEY.<key>.npy members"
VERSION = 1
TORCHRUN_RANKS = True  # each rank of a torchrun launch encodes every WORLD_SIZE-th task
MAX_NOTES = 20


class Config(StageConfig):
    input_dir: Path | None = Field(None, description="shards to encode (default: the output of the last "
                                   "enabled stage before it that writes shards: reorganize_tar)")
    output_dir: Path | None = Field(None, description="encoded shards (default: <root>/tarfiles_precached)")
    encoders: list[EncoderConfig] = Field(
        default_factory=list, description="the encoders to run on every sample"
    )
    keep_source: bool = Field(
        True,
        description="write the encodings next to the source members (true) or in "
        "shards of their own, same relative names, for merge_source_tar (false)",
    )
    recursive: bool = Field(True, description="also encode shards in sub-folders of input_dir")
    batch_size: int = Field(32, ge=1, description="samples per forward pass (per encoder, per bucket)")
    num_workers: int = Field(
        4,
        ge=0,
        description="DataLoader worker processes that read, decode and resize (0: in the main process)",
    )
    prefetch_factor: int = Field(2, ge=1, description="chunks each worker prepares ahead")
    shards_per_task: int = Field(
        1,
        ge=1,
        description="shards per task: more amortises worker start-up on fast GPUs; resume stays per shard",
    )
    device: str = Field(
        "auto",
        description="auto (a GPU when CUDA is available, else cpu), cpu, cuda or cuda:N. Which GPU: "
        "cuda:LOCAL_RANK under torchrun; in the local pool (--workers N) worker i takes GPU i modulo the "
        "GPUs; under --runner ray the GPU Ray gives the task",
    )
    seed: int = Field(0, description="seed of latent_mode: sample draws (combined with each sample key)")
    cudnn_benchmark: bool = Field(
        False,
        description="on CUDA, let cuDNN time and pick the fastest convolution kernels: faster VAE "
        "encodes, but the pick may differ between runs, so a re-run shard may differ in the last bits "
        "(off: deterministic kernels, the same bytes on the same GPU model)",
    )
    on_error: Literal["drop", "fail"] = Field(
        "drop",
        description="a sample whose source member is missing or "
        "undecodable: drop it (counted and named) or fail the shard",
    )


# -------------------------------------------------------------------------------------------- plan


def _dirs(cfg: Config) -> tuple[Path, Path]:
    if cfg.input_dir is None:
        raise PrepError(
            "precache_encodings.input_dir is not set",
            "config",
            "set precache_encodings.input_dir or dataset_output_root",
        )
    if cfg.output_dir is None:
        raise PrepError(
            "precache_encodings.output_dir is not set",
            "config",
            "set precache_encodings.output_dir or dataset_output_root",
        )
    if Path(cfg.output_dir).resolve() == Path(cfg.input_dir).resolve():
        raise PrepError(
            "output_dir is input_dir: encoded shards would replace their sources",
            "precache_encodings",
            "choose another output_dir",
        )
    return Path(cfg.input_dir), Path(cfg.output_dir)


def output_dirs(root: PrepConfig) -> list[Path]:
    """The folder this stage writes (its done-markers under .prep/)."""
    return [_dirs(root.precache_encodings)[1]]


def output_settings(cfg: Config) -> dict[str, Any]:
    """Everything that decides the output bytes (not how fast they are made)."""
    return {
        "encoders": [e.model_dump(mode="json") for e in cfg.encoders],
        "keep_source": cfg.keep_source,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "on_error": cfg.on_error,
    }


def gpus_per_task(root: PrepConfig) -> float:
    """A GPU for each task unless the device is the CPU: the Ray runner asks Ray for it, so each task
    encodes on a GPU of its own (a Ray task that asks for none sees the node's GPUs unassigned, and
    every task of the node took cuda:0)."""
    return 0.0 if root.precache_encodings.device == "cpu" else 1.0


def prepare(root: PrepConfig, opts: RunOptions) -> None:
    """Check the whole encoder list before any shard is read. It imports the model classes (seconds for
    diffusers and transformers), so the runner calls it only when some task has work to do."""
    from prep.encoders.validate import validate_encoders

    validate_encoders(root.precache_encodings.encoders)


def plan(root: PrepConfig, opts: RunOptions) -> list[Task]:
    from prep.formats.tar import shard_folder

    cfg: Config = root.precache_encodings
    in_dir, out_dir = _dirs(cfg)
    shards = shard_folder(in_dir, "run reorganize_tar first or fix precache_encodings.input_dir",
                          recursive=cfg.recursive, skip=out_dir)
    if not shards:
        raise PrepError(
            "no .tar shards found", str(in_dir), "point precache_encodings.input_dir at a shard folder"
        )
    settings = output_settings(cfg)
    tasks: list[Task] = []
    for g in range(0, len(shards), cfg.shards_per_task):
        items, outputs = [], []
        for tar in shards[g : g + cfg.shards_per_task]:
            rel = tar.relative_to(in_dir).as_posix()
            st = tar.stat()
            items.append(
                {"tar": str(tar.resolve()), "rel": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            )
            dst = out_dir.resolve() / rel
            outputs += [str(dst), str(index_path(dst))]
        tasks.append(
            Task(str(items[0]["rel"]), {"shards": items, "settings": settings}, tuple(outputs),
                 weight=len(items))
        )
    return tasks


# --------------------------------------------------------------------------------------------- run

_LOADED: dict[str, list[Any]] = {}


def pick_device(spec: str, cudnn_benchmark: bool = False) -> Any:
    """The torch device for `spec`; on CUDA also the cuDNN mode: deterministic kernels unless
    `cudnn_benchmark` (the timed pick may change between runs, and with it the output's last bits)."""
    import torch

    local = local_gpu_index(torch.cuda.device_count()) if spec in ("auto", "cuda") else 0
    if spec == "auto":
        spec = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda":
        spec = f"cuda:{local}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise PrepError(
            f"device {spec!r} is not a torch device",
            "precache_encodings.device",
            "use auto, cpu, cuda or cuda:N",
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrepError(
                "device is cuda but CUDA is not available",
                "precache_encodings.device",
                "use device: auto or cpu, or install a CUDA build of torch",
            )
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cudnn.deterministic = not cudnn_benchmark
    return device


def loaded_encoders(cfg: Config) -> list[Any]:
    """The configured encoders, loaded once per process (tasks after the first reuse them)."""
    from prep.encoders.models import load_encoder

    device = pick_device(cfg.device, cfg.cudnn_benchmark)
    sig = json.dumps(
        [[e.model_dump(mode="json") for e in cfg.encoders], str(device), cfg.seed], sort_keys=True
    )
    if sig not in _LOADED:
        _LOADED.clear()
        _LOADED[sig] = [load_encoder(e, device, cfg.seed) for e in cfg.encoders]
    return _LOADED[sig]


def _records(root: PrepConfig) -> Path:
    """Where each finished shard's record is kept (`marker_file` names them)."""
    return marker_dir(output_dirs(root)[0], NAME) / "shards"


def _shard_fingerprint(item: dict[str, Any], settings: dict[str, Any]) -> str:
    doc = json.dumps({"version": VERSION, "shard": item, "settings": settings}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _reusable(root: PrepConfig, item: dict[str, Any], settings: dict[str, Any],
              dst: Path) -> dict[str, Any] | None:
    """The record (outcome, encoder identities) of a shard finished earlier by a killed task of the
    same config, if its output is intact."""
    try:  # an older prep's record counts too: its fingerprint holds the shard's rel
        rec = json.loads(recorded_marker_file(_records(root), item["rel"]).read_text("utf-8"))
        intact = dst.stat().st_size == rec["outcome"]["bytes"] and index_path(dst).exists()
    except (OSError, ValueError, KeyError):
        return None
    return rec if intact and rec.get("fingerprint") == _shard_fingerprint(item, settings) else None


def _outcome_json(o: Any) -> dict[str, Any]:
    return {
        "rel": o.rel,
        "samples_in": o.samples_in,
        "samples": o.samples_out,
        "bytes": o.bytes,
        "checksum": o.checksum,
        "dropped": dict(o.dropped),
        "notes": o.notes,
        "fields": o.fields,
        "replaced": o.replaced,
    }


def run_task(task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult:
    from prep.formats.tar import scan_tar
    from prep.stages.precache_loop import LoopOptions, ShardJob, encode_shards

    cfg: Config = root.precache_encodings
    _, out_dir = _dirs(cfg)
    settings = task.payload["settings"]
    done: dict[str, dict[str, Any]] = {}
    identities: dict[str, Any] = {}
    jobs: list[ShardJob] = []
    for item in task.payload["shards"]:
        dst = out_dir.resolve() / item["rel"]
        prior = None if opts.force else _reusable(root, item, settings, dst)
        if prior is not None:
            done[item["rel"]] = prior["outcome"]
            identities.update(prior.get("encoders") or {})
            continue
        jobs.append(ShardJob(item["tar"], str(dst), item["rel"], scan_tar(item["tar"]).samples))
    items = {i["rel"]: i for i in task.payload["shards"]}

    encoders = loaded_encoders(cfg) if jobs else []
    identities.update({e.cfg.key: e.identity() for e in encoders})

    def record(outcome: Any) -> None:
        doc = {
            "fingerprint": _shard_fingerprint(items[outcome.rel], settings),
            "outcome": _outcome_json(outcome),
            "encoders": identities,
        }
        write_text_atomic(marker_file(_records(root), outcome.rel), json.dumps(doc, sort_keys=True))

    loop = LoopOptions(
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        keep_source=cfg.keep_source,
        on_error=cfg.on_error,
    )
    for o in encode_shards(jobs, encoders, loop, record) if jobs else []:
        done[o.rel] = _outcome_json(o)
    shards = [done[i["rel"]] for i in task.payload["shards"]]
    dropped: Counter[str] = Counter()
    for s in shards:
        dropped.update(s["dropped"])
    return TaskResult(
        task.id,
        counts={
            "shards": len(shards),
            "shards_resumed": len(shards) - len(jobs),
            "samples_in": sum(s["samples_in"] for s in shards),
            "samples_out": sum(s["samples"] for s in shards),
            "members_replaced": sum(s["replaced"] for s in shards),
        },
        dropped=dict(dropped),
        notes=[n for s in shards for n in s["notes"]][:MAX_NOTES],
        data={
            "shards": shards,
            "encoders": identities,
            "rank": torchrun_slice()[0] or 0,
        },
        outputs={
            str(out_dir.resolve() / s["rel"]): {"bytes": s["bytes"], "checksum": s["checksum"]}
            for s in shards
        },
    )


# -------------------------------------------------------------------------------------------- finalize


def merge_fields(shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per member extension: dtype (and storage), total samples, and the shape(s) across all shards."""
    from prep.stages.precache_loop import shape_summary

    out: dict[str, dict[str, Any]] = {}
    shapes: dict[str, Counter[tuple[int, ...]]] = {}
    for s in shards:
        for ext, meta in s["fields"].items():
            entry = out.setdefault(ext, {k: v for k, v in meta.items() if k in ("dtype", "storage")})
            entry["samples"] = entry.get("samples", 0) + meta.get("samples", 0)
            c = shapes.setdefault(ext, Counter())
            for shp in meta.get("shapes") or ([meta["shape"]] if meta.get("shape") is not None else []):
                c[tuple(shp)] += 1
    for ext, entry in out.items():
        if shapes[ext]:
            entry.update(shape_summary(shapes[ext]))
    return dict(sorted(out.items()))


def finalize(root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]:
    cfg: Config = root.precache_encodings
    in_dir, out_dir = _dirs(cfg)
    shards = sorted((s for r in results for s in r.data["shards"]), key=lambda s: s["rel"])
    encoders: dict[str, Any] = {}
    for r in results:
        encoders.update(r.data.get("encoders") or {})
    try:
        source = read_manifest(in_dir)
    except PrepError:
        source = None
    history = list(source.history) if source else []
    history.append({"stage": NAME, "keep_source": cfg.keep_source, "encoders": sorted(encoders)})
    manifest = Manifest(
        shards=[ShardEntry(s["rel"], s["samples"], s["bytes"], s["checksum"]) for s in shards],
        fields=merge_fields(shards),
        encoders=dict(sorted(encoders.items())),
        history=history,
        chunk_size=source.chunk_size if source else None,
    )
    path = write_manifest(out_dir, manifest)
    fields = ", ".join(f".{k} {v.get('dtype')} {v.get('shape')}" for k, v in manifest.fields.items())
    notes = [f"wrote {path} ({len(shards)} shards, {manifest.total_samples} samples; {fields})"]
    dropped = sum(s["samples_in"] - s["samples"] for s in shards)
    if dropped:
        notes.append(
            f"WARNING: {dropped} sample(s) dropped (see the dropped rows); their shards hold fewer samples"
        )
    return notes + unplanned_shards_warning(out_dir, {s["rel"] for s in shards}, recursive=cfg.recursive)
