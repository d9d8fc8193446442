"""The precache stage's loop over a group of shards: DataLoader workers read and prepare samples, the
main thread batches them (by bucket) and runs each encoder's forward on the device, and a writer thread
turns outputs into `.npy` members and writes the output shard, so the device never waits on disk.

Batches never span shards and are formed in sample order, so the output of a shard depends on its
samples and the config only (not on worker count, rank, or which shards share a task).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.utils.data as tud

from prep.encoders.models import DTYPES, Encoder
from prep.encoders.storage import field_meta, npy_bytes
from prep.errors import PrepError
from prep.formats.atomic import temp_name
from prep.formats.index import write_index
from prep.formats.tar import Sample, read_member
from prep.formats.tar_write import FileSlice, write_shard

MAX_NAMED_DROPS = 5
MAX_SHAPES = 64


@dataclass
class ShardJob:
    """One input shard and where its output goes."""

    src: str
    dst: str
    rel: str
    samples: list[Sample]


@dataclass
class ShardOutcome:
    """What encoding one shard produced (JSON-ready parts only)."""

    rel: str
    samples_in: int
    samples_out: int = 0
    bytes: int = 0
    checksum: str = ""
    dropped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    replaced: int = 0


@dataclass
class Chunk:
    """Up to batch_size consecutive samples of one shard, prepared for every encoder."""

    shard: int
    keys: list[str]
    items: list[list[Any]]
    errors: dict[str, str]


def source_member(sample: Sample, exts: list[str]) -> str | None:
    """The first of `exts` the sample has (case-insensitive), as the sample spells it."""
    lower = {e.lower(): e for e in sample.members}
    return next((lower[e] for e in exts if e in lower), None)


def reason_class(reason: str) -> str:
    """`undecodable image (OSError: ...)` -> `undecodable image`: the summary counts classes."""
    return reason.split(" (", 1)[0]


class ChunkDataset(tud.Dataset):
    """Map-style: item i is chunk i. Workers read members by offset from their own file handles."""

    def __init__(
        self, jobs: list[ShardJob], chunk_size: int, preparers: list[Any], sources: list[list[str]]
    ) -> None:
        self.jobs = jobs
        self.preparers = preparers
        self.sources = sources
        self.chunks = [
            (j, a, min(a + chunk_size, len(job.samples)))
            for j, job in enumerate(jobs)
            for a in range(0, len(job.samples), chunk_size)
        ]
        self._files: dict[str, BinaryIO] = {}

    def __len__(self) -> int:
        return len(self.chunks)

    def _file(self, path: str) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            for old in self._files.values():
                old.close()
            self._files = {path: open(path, "rb")}  # noqa: SIM115 - kept open across chunks of one shard
            f = self._files[path]
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getitem__(self, i: int) -> Chunk:
        j, a, b = self.chunks[i]
        job = self.jobs[j]
        f = self._file(job.src)
        samples = job.samples[a:b]
        errors: dict[str, str] = {}
        items: list[list[Any]] = []
        for prep, exts in zip(self.preparers, self.sources, strict=True):
            datas: list[bytes] = []
            where: list[int] = []
            for n, s in enumerate(samples):
                ext = source_member(s, exts)
                if ext is None:
                    errors.setdefault(s.key, f"no .{'/.'.join(exts)} member")
                    continue
                datas.append(read_member(f, s.members[ext]))
                where.append(n)
            out: list[Any] = [None] * len(samples)
            for n, r in zip(where, prep.prepare(datas) if datas else [], strict=True):
                if isinstance(r, BaseException):
                    errors.setdefault(samples[n].key, str(r))
                else:
                    out[n] = r
            items.append(out)
        return Chunk(j, [s.key for s in samples], items, errors)


class Batcher:
    """Collect (key, item) per group (bucket); hand out a batch as soon as a group is full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.groups: dict[Hashable, list[tuple[str, Any]]] = {}

    def add(self, key: str, item: Any, group: Hashable) -> list[list[tuple[str, Any]]]:
        g = self.groups.setdefault(group, [])
        g.append((key, item))
        if len(g) >= self.size:
            del self.groups[group]
            return [g]
        return []

    def flush(self) -> list[list[tuple[str, Any]]]:
        out = list(self.groups.values())
        self.groups = {}
        return out


def cast_for_storage(t: torch.Tensor, store_dtype: str) -> torch.Tensor:
    """Floating outputs to the stored dtype (bfloat16 as int16 bits); masks and ids stay as they are."""
    if not t.is_floating_point():
        return t
    if store_dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16)
    return t.to(DTYPES[store_dtype])


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start an asynchronous copy to pinned host memory; the event tells the writer when it landed."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.contiguous(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class Writer:
    """A thread that serialises outputs to `.npy` members and writes each shard when it is complete.

    Members are spooled to a hidden temp file beside the output shard as they arrive, so memory stays
    bounded even for T5-XXL-sized outputs (4-8 MB a caption); the shard then streams them from there.
    A killed run's spool is a `.NAME.tmp-*` file, which the runner removes when the task is re-run.
    """

    def __init__(
        self,
        jobs: list[ShardJob],
        outcomes: list[ShardOutcome],
        keep_source: bool,
        depth: int,
        on_done: Callable[[ShardOutcome], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.on_done = on_done
        self.outcomes = outcomes
        self.keep_source = keep_source
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.pending: dict[int, dict[str, dict[str, FileSlice]]] = {}
        self.spools: dict[int, tuple[str, BinaryIO]] = {}
        self.shapes: dict[int, dict[str, Counter[tuple[int, ...]]]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="precache-writer", daemon=True)
        self.thread.start()

    def put(self, msg: tuple) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(msg, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every queued write; re-raise the writer's error, if any."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=30)
        for shard in list(self.spools):
            self._drop_spool(shard)

    def _spool(self, shard: int) -> tuple[str, BinaryIO]:
        if shard not in self.spools:
            path = temp_name(Path(self.jobs[shard].dst))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.spools[shard] = (str(path), open(path, "w+b"))  # noqa: SIM115 - closed in _drop_spool
        return self.spools[shard]

    def _drop_spool(self, shard: int) -> None:
        path, f = self.spools.pop(shard, ("", None))
        if f is not None:
            f.close()
            os.unlink(path)

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is None:
                return
            if self.error is not None:
                continue  # keep draining so the main thread never blocks on a dead writer
            try:
                if msg[0] == "data":
                    self._data(*msg[1:])
                else:
                    self._finish(*msg[1:])
            except BaseException as err:
                self.error = err

    def _data(
        self,
        shard: int,
        ext: str,
        keys: list[str],
        host: torch.Tensor,
        event: Any,
        lengths: list[int] | None,
        store_dtype: str,
    ) -> None:
        if event is not None:
            event.synchronize()
        arr = host.numpy()
        if arr.dtype == np.int16 and store_dtype == "bfloat16" and host.dtype == torch.int16:
            arr = arr.view(np.uint16)
        pending = self.pending.setdefault(shard, {})
        shapes = self.shapes.setdefault(shard, {}).setdefault(ext, Counter())
        fields = self.outcomes[shard].fields
        if ext not in fields:
            fields[ext] = field_meta(store_dtype, arr.dtype)
        path, spool = self._spool(shard)
        for i, k in enumerate(keys):
            a = arr[i] if lengths is None else arr[i, : lengths[i]]
            data = npy_bytes(a)
            pending.setdefault(k, {})[ext] = FileSlice(path, spool.tell(), len(data))
            spool.write(data)
            shapes[tuple(a.shape)] += 1

    def _finish(self, shard: int, ok: list[str], n_fields: int) -> None:
        job, outcome = self.jobs[shard], self.outcomes[shard]
        encoded = self.pending.pop(shard, {})
        keep = set(ok)
        samples: list[tuple[str, dict[str, Any]]] = []
        for s in job.samples:
            if s.key not in keep:
                continue
            enc = encoded.get(s.key, {})
            if len(enc) != n_fields:
                raise PrepError(
                    f"sample {s.key!r} got {len(enc)} of {n_fields} encodings",
                    job.src,
                    "this is a bug in precache_encodings; report it with the config",
                )
            members: dict[str, Any] = {}
            if self.keep_source:
                for ext, m in s.members.items():
                    if ext in enc:
                        outcome.replaced += 1
                        continue
                    members[ext] = FileSlice(job.src, m.data_offset, m.size)
            members.update(enc)
            samples.append((s.key, members))
        os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
        if shard in self.spools:
            self.spools[shard][1].flush()
        try:
            info = write_shard(job.dst, samples)
        finally:
            self._drop_spool(shard)
        write_index(job.dst, info.offsets)
        outcome.samples_out, outcome.bytes, outcome.checksum = len(samples), info.bytes, info.checksum
        for ext, shapes in self.shapes.pop(shard, {}).items():
            outcome.fields[ext].update(shape_summary(shapes), samples=sum(shapes.values()))
        if self.on_done is not None:
            self.on_done(outcome)


def shape_summary(shapes: Counter[tuple[int, ...]]) -> dict[str, Any]:
    """`shape` when all agree; else `shape` with null in the varying dims and the distinct `shapes`."""
    distinct = sorted(shapes)
    if len(distinct) == 1:
        return {"shape": list(distinct[0])}
    ranks = {len(s) for s in distinct}
    shape: list[int | None] | None = None
    if len(ranks) == 1:
        shape = [d[0] if len(set(d)) == 1 else None for d in zip(*distinct, strict=True)]
    return {"shape": shape, "shapes": [list(s) for s in distinct[:MAX_SHAPES]]}


@dataclass
class LoopOptions:
    batch_size: int = 32
    num_workers: int = 2
    prefetch_factor: int = 2
    keep_source: bool = True
    on_error: str = "drop"
    writer_depth: int = 16


def encode_shards(
    jobs: list[ShardJob],
    encoders: list[Encoder],
    opts: LoopOptions,
    on_done: Callable[[ShardOutcome], None] | None = None,
) -> list[ShardOutcome]:
    """Encode every sample of `jobs` with every encoder and write one output shard per job;
    `on_done` runs (in the writer thread) right after each shard is written."""
    outcomes = [ShardOutcome(job.rel, len(job.samples)) for job in jobs]
    n_fields = sum(len(e.cfg.field_names()) for e in encoders)
    ds = ChunkDataset(jobs, opts.batch_size, [e.preparer for e in encoders], [e.cfg.source for e in encoders])
    writer = Writer(jobs, outcomes, opts.keep_source, opts.writer_depth, on_done)
    batchers = [Batcher(opts.batch_size) for _ in encoders]
    remaining = Counter(j for j, _, _ in ds.chunks)
    ok: dict[int, list[str]] = {j: [] for j in range(len(jobs))}

    def run(e: int, shard: int, batch: list[tuple[str, Any]]) -> None:
        enc = encoders[e]
        keys = [k for k, _ in batch]
        outs = enc.forward(enc.collate([it for _, it in batch]), keys)
        for ext, (t, lengths) in outs.items():
            host, event = to_host(cast_for_storage(t, enc.cfg.compute_store_dtype))
            writer.put(("data", shard, ext, keys, host, event, lengths, enc.cfg.compute_store_dtype))

    loader = tud.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=opts.num_workers,
        collate_fn=_identity,
        prefetch_factor=opts.prefetch_factor if opts.num_workers else None,
    )
    try:
        for j in range(len(jobs)):
            if remaining[j] == 0:
                writer.put(("finish", j, [], n_fields))
        with torch.inference_mode():
            for chunk in loader:
                j = chunk.shard
                out = outcomes[j]
                for key, reason in chunk.errors.items():
                    if opts.on_error == "fail":
                        raise PrepError(
                            f"sample {key!r}: {reason}",
                            jobs[j].src,
                            "repair or remove the sample, or set precache_encodings.on_error: drop",
                        )
                    out.dropped[reason_class(reason)] += 1
                    if len(out.notes) < MAX_NAMED_DROPS:
                        out.notes.append(f"{jobs[j].rel}: dropped sample {key!r}: {reason}")
                for e, enc in enumerate(encoders):
                    for key, item in zip(chunk.keys, chunk.items[e], strict=True):
                        if key not in chunk.errors:
                            for batch in batchers[e].add(key, item, enc.preparer.group(item)):
                                run(e, j, batch)
                ok[j] += [k for k in chunk.keys if k not in chunk.errors]
                remaining[j] -= 1
                if remaining[j] == 0:
                    for e, b in enumerate(batchers):
                        for batch in b.flush():
                            run(e, j, batch)
                    writer.put(("finish", j, ok[j], n_fields))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        ds.close()
    return outcomes


def _identity(x: Any) -> Any:
    return x
