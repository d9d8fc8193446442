"""The shape every stage shares: a pydantic `Config`, a pure `plan()`, an idempotent `run_task()`.

A stage is a module that satisfies `StageModule` (mypy checks each one, see `prep.stages`): `NAME`,
`TITLE` (one line for `prep stages`), `VERSION` (bumped when the same task would write other bytes),
`TORCHRUN_RANKS` (whether the ranks of a torchrun launch split its tasks), `Config` (a `StageConfig`),
`plan(root, opts) -> list[Task]`, `run_task(task, root, opts) -> TaskResult`, `finalize(root, results,
opts)`, which runs once every task of the whole plan is done and returns lines for the summary, and
`output_dirs(root)`: every place it writes (folders, or files whose siblings are swept), the first
being the folder that holds its done-markers (`marker_dir`). A stage may also define
`prepare(root, opts)`: checks that cost time (precache imports its model classes), which the runner
calls only when some task has work to do (and on --dry-run), so a re-run with every task done stays
instant; and `gpus_per_task(root)`: the GPUs a task wants (the Ray runner asks Ray for them, so each
task has a GPU of its own). The runner checks that folder can be written before any task and
sweeps dead writers' temp files from every place when the stage completes. `root` is the whole
validated config (`prep.config.PrepConfig`). Stage modules import no torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field

from prep.formats.urls import redact_urls_in
from prep.models import ConfigModel

if TYPE_CHECKING:  # the root model is built from every stage's Config (prep.config, a layer above)
    from prep.config import PrepConfig


class StageConfig(ConfigModel):
    """Base of every stage's section: unknown keys are errors, and every stage can be switched off."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enable: bool = Field(True, description="run this stage in `prep run all`")


@dataclass(frozen=True)
class KeyDoc:
    """One config key as users read it (`prep keys`, the generated stage guides)."""

    key: str
    type: str
    default: str
    description: str


_QUALIFIED = re.compile(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])")


def type_name(annotation: Any) -> str:
    """`SecretStr | None`, not `pydantic.types.SecretStr | None`: the annotation without module paths."""
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return _QUALIFIED.sub("", str(annotation))


def key_docs(model: type[BaseModel]) -> list[KeyDoc]:
    """Every key of a config model with its type, default (`required` when it has none) and description:
    the one home of that listing, so the docs generated from it never drift from the code."""
    out = []
    for key, field_ in model.model_fields.items():
        default = "required" if field_.is_required() else repr(field_.get_default(call_default_factory=True))
        out.append(KeyDoc(key, type_name(field_.annotation), default, field_.description or ""))
    return out


@dataclass(frozen=True)
class Task:
    """The unit of parallel work. `id` is stable and names the done-marker; `payload` is JSON and
    holds every input that decides the outputs, so its hash tells a finished task from a stale one."""

    id: str
    payload: dict[str, Any]
    outputs: tuple[str, ...] = ()
    weight: int = 1

    def fingerprint(self, stage: str, version: int) -> str:
        """The hash of what decides the outputs, with each URL that holds a secret (a presigned URL's
        signature, user info) as `shown_url` shows it: the same table signed again keeps its tasks
        done, as ingest_local keeps its keys, instead of reading every image again."""
        doc = json.dumps({"stage": stage, "version": version, "payload": self.payload}, sort_keys=True,
                         default=str)
        return hashlib.sha256(redact_urls_in(doc).encode()).hexdigest()

    def shown_payload(self) -> Any:
        """The payload as `--dry-run` shows it: URLs that hold a secret redacted."""
        return json.loads(redact_urls_in(json.dumps(self.payload, default=str)))


@dataclass
class TaskResult:
    """What a task did. `counts` adds up across tasks (samples_in, samples_out, ...); `dropped` maps a
    reason to a count; `notes` are human lines (dropped keys, warnings); `data` is JSON for finalize;
    `outputs` maps output path to {bytes, checksum} where the task already knows them; `rewrote` maps a
    file an earlier stage wrote and this task rewrote in place (an in-place merge) to the {bytes, checksum}
    it replaced, so that stage's done-marker stays valid (`runtime.markers.record_rewrites`); `transient`
    counts items it could not do for a reason that may pass (a server error, a timeout): the task is done
    and its marker written, but the next run does it again instead of keeping those items lost."""

    task_id: str
    status: str = "done"  # done | skipped | failed
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    rewrote: dict[str, dict[str, Any]] = field(default_factory=dict)
    transient: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "status": self.status, "counts": self.counts,
                "dropped": self.dropped, "notes": self.notes, "data": self.data,
                "outputs": self.outputs, "error": self.error, "seconds": round(self.seconds, 3),
                "rewrote": self.rewrote, "transient": self.transient}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TaskResult:
        return cls(doc["task_id"], doc.get("status", "done"), doc.get("counts", {}), doc.get("dropped", {}),
                   doc.get("notes", []), doc.get("data", {}), doc.get("outputs", {}), doc.get("error"),
                   doc.get("seconds", 0.0), doc.get("rewrote", {}), int(doc.get("transient", 0)))


@dataclass
class RunOptions:
    """How to run, as opposed to what to compute (that is the config)."""

    workers: int = 1
    runner: str = "local"  # local | ray
    ray_address: str | None = None
    task_index: int | None = None
    num_tasks: int | None = None
    dry_run: bool = False
    strict: bool = False
    retry_failed: bool = False
    verify_markers: bool = False
    force: bool = False
    json: bool = False
    quiet: bool = False
    debug: bool = False  # keep tracebacks of failed tasks (shown with --debug)
    extra: dict[str, Any] = field(default_factory=dict)


def slice_tasks(tasks: list[Task], task_index: int | None, num_tasks: int | None) -> list[Task]:
    """Slurm-array slicing: slice I of N takes every N-th task starting at I (balanced, deterministic)."""
    if num_tasks is None and task_index is None:
        return tasks
    if num_tasks is None or task_index is None or num_tasks < 1 or not 0 <= task_index < num_tasks:
        from prep.errors import PrepError

        raise PrepError(f"--task-index {task_index} / --num-tasks {num_tasks} is not a valid slice",
                        "command line", "give both, with 0 <= task-index < num-tasks")
    return tasks[task_index::num_tasks]


def unplanned_shards_warning(folder: Path, planned: set[str], *, recursive: bool = True) -> list[str]:
    """A warning naming the shards in a stage's output `folder` (relative names) that this plan did not
    write: an earlier, larger plan's. The next stage reads every shard there, so their samples would be
    in the dataset twice. [] when there are none."""
    from prep.formats.tar import shard_files

    stale = [p.relative_to(folder).as_posix() for p in shard_files(folder, recursive=recursive)] \
        if folder.is_dir() else []
    stale = [r for r in stale if r not in planned]
    if not stale:
        return []
    return [f"WARNING: {len(stale)} older shard(s) in {folder} are not part of this output (first: "
            f"{stale[0]}); manifest.json lists only the current ones, but the next stage reads every shard "
            "there — delete the others"]


def rel(path: Path, root: Path) -> str:
    """A POSIX path of `path` relative to `root` (for manifests and task ids)."""
    return path.resolve().relative_to(root.resolve()).as_posix()


class StageModule(Protocol):
    """What the runner and the CLI rely on in a stage module (see the module docstring)."""

    NAME: str
    TITLE: str
    VERSION: int
    TORCHRUN_RANKS: bool

    @property
    def Config(self) -> type[StageConfig]: ...

    def plan(self, root: PrepConfig, opts: RunOptions) -> list[Task]: ...

    def run_task(self, task: Task, root: PrepConfig, opts: RunOptions) -> TaskResult: ...

    def finalize(self, root: PrepConfig, results: list[TaskResult], opts: RunOptions) -> list[str]: ...

    def output_dirs(self, root: PrepConfig) -> list[Path]: ...


def marker_dir(output_dir: Path, stage: str) -> Path:
    """Where a stage's done-markers live: `<its first output folder>/.prep/done/<stage>`."""
    return output_dir / ".prep" / "done" / stage


MAX_MARKER_NAME = 200  # bytes; file systems allow 255 per name


def marker_file(folder: Path, name: str) -> Path:
    """`folder/<name>.json`: the one file a record named `name` (a task id, a shard's relative path) is
    kept in. `%` and `/` are percent-encoded, the escape character first, so distinct names never share
    a file (`a/b` -> `a%2Fb`, `a__b` and `a%2Fb` stay themselves or `a%252Fb`); a name too long for a
    file keeps a readable head plus a hash of the whole."""
    return folder / _bounded(name.replace("%", "%25").replace("/", "%2F"), name)


def legacy_marker_file(folder: Path, name: str) -> Path:
    """The file earlier versions of prep used (`/` as `__`, so `a/b` and `a__b` shared it). Only read, so
    folders an older prep finished keep their done-markers; the record inside names its task or shard,
    so a file two of them shared is trusted only for the one it names."""
    return folder / _bounded(name.replace("/", "__"), name)


def recorded_marker_file(folder: Path, name: str) -> Path:
    """The file the record of `name` is read from: its own (`marker_file`), else the one an older prep
    wrote (`legacy_marker_file`), so folders it finished keep their records."""
    path = marker_file(folder, name)
    return path if path.exists() else legacy_marker_file(folder, name)


def _bounded(safe: str, name: str) -> str:
    raw = safe.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_MARKER_NAME:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        safe = raw[: MAX_MARKER_NAME - 17].decode("utf-8", "ignore") + "-" + digest
    return f"{safe}.json"


POOL_WORKER_ENV = "PREP_POOL_WORKER"  # the local pool's worker number (0, 1, ...), set in each worker


def local_gpu_index(device_count: int) -> int:
    """Which of this machine's `device_count` visible GPUs this process uses: LOCAL_RANK under torchrun;
    in the local pool, its worker number modulo the GPUs (eight workers on eight GPUs get one each,
    not all cuda:0); else 0 (one process, or a Ray task, which sees only the GPU Ray gave it)."""
    env = os.environ
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    if env.get(POOL_WORKER_ENV, "").isdigit() and device_count > 0:
        return int(env[POOL_WORKER_ENV]) % device_count
    return 0


def launcher_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, else (0, 1, 0). Slurm steps of several
    tasks are not guessed (a batch script sees SLURM_NTASKS too): pass --task-index $SLURM_PROCID
    --num-tasks $SLURM_NTASKS there."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def torchrun_slice() -> tuple[int | None, int | None]:
    """(rank, world) under torchrun: each rank takes every world-th task of its (Slurm array) slice.
    (None, None) for a single process."""
    rank, world, _ = launcher_env()
    return (rank, world) if world > 1 else (None, None)
