"""Loader benchmark: prep.loaders vs webdataset, torchdata's StatefulDataLoader, megatron-energon,
mosaicml-streaming and litdata, and the decoders' own ceilings, on the same data, on the same machine,
in the same run.

Data: N samples of 256x256 JPEG (q90, ~18 KiB) + txt + json in S tars (default 20,000 in 20). Every
loader runs with 2 workers, batch 32, shuffling on, in a fresh process per measurement:
- ceilings: the decoder alone in 2 processes on JPEG bytes already in memory (simplejpeg at native size
  and DCT-scaled to 128x128, Pillow): no loader can beat them on these cores, so a loader's share of its
  decoder's ceiling is the figure of merit. simplejpeg's are measured twice: into one reused array (it
  stays in the core's L2 cache; the issue's ceiling) and into the rows of 32-image batch buffers, what
  any loader must write to hand out distinct images (like for like; in one process alone it ran 0-8%
  slower than the reused array, in the bench's runs within 2% of it);
- raw: batches of undecoded bytes; decode: a uint8 image batch (+ captions as str) — prep's default
  call (`decode="uint8"`, native size, Bx3xHxW channels_last), peers' PIL decode + stack; decode128:
  prep with `image_size=128` (DCT scaling alone reaches it); pil: prep with raw bytes and the peers' PIL
  decode in a transform (the same work as the peers' decode);
- first batch: a fresh process builds the loader and takes its first batch (decode mode, imports not
  timed); resume: a process runs K batches and saves the loader state, a fresh process restores it
  and takes its first batch (decode mode), and the next 20 batches must equal an uninterrupted run's.
  Resume positions run on a second, larger index (`--resume-samples`, default 1,000,000 samples of
  16x16 JPEG + txt + json) so K=30,000 batches lies inside one epoch.
Throughput and first-batch times are medians of `--repeats` runs, taken round robin over everything
measured (a load change on a shared machine hits all of them), each loader run from a warm page cache
(every data file read just before it), after a warm-up of `--warmup` batches
(150: the steady state, past every worker's one-time start, e.g. creating prep's shared-memory slots); CPU
time per sample (main process + workers) is reported beside samples/s, and the share of the ceiling
by both (ceiling/loader): on a shared machine the CPU figure is the steadier one. A share is the
median of the rounds' ratios (each round's loader run over the same round's ceiling run). Replaying loaders
(torchdata over webdataset, energon) resume at `--replay-k` (their cost grows with K by design); the
others at `--resume-k`.

Run: `python bench/loaders.py` (peers come with `make install-bench`, a venv of their own: they pin
older numpy/transformers; a peer that is not installed is reported as such). `--quick` is a smoke run
at a tenth of the size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ["prep", "webdataset", "torchdata", "energon", "streaming", "litdata"]
BATCH, WORKERS, SEED, NEXT = 32, 2, 0, 20
RESIZED = 128  # a target the decoder reaches by DCT scaling alone (1/2 of 256)
SHUFFLE_BUFFER = 1000


# ------------------------------------------------------------------------------------------------ data
def make_data(root: Path, samples: int, shards: int, image: int = 256) -> Path:
    """Shards (+ .idx, manifest.json, .nv-meta) and the MDS / litdata copies of the same samples."""
    tars = root / "tars"
    done = [samples, shards, image]
    if (root / "done.json").exists() and json.loads((root / "done.json").read_text()) == done:
        _make_peer_copies(root, tars)  # those whose library was not installed when the data was made
        return root
    shutil.rmtree(root, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "src"))
    from prep.formats.index import write_index
    from prep.formats.manifest import Manifest, ShardEntry, write_manifest
    from prep.formats.nvmeta import write_nv_meta
    from prep.formats.tar_write import write_shard
    from prep.testing.loader_data import jpeg_bytes

    images = [jpeg_bytes(i, image, 90, noise=7.5) for i in range(500)]
    per = samples // shards
    tars.mkdir(parents=True)
    entries = []
    for s in range(shards):
        rows = []
        for r in range(per):
            key = f"{s:04d}{r:06d}"
            rows.append(
                (
                    key,
                    {
                        "jpg": images[(s * per + r) % len(images)],
                        "txt": f"a photo number {s * per + r} of a benchmark".encode(),
                        "json": json.dumps({"shard": s, "row": r, "width": image}).encode(),
                    },
                )
            )
        info = write_shard(tars / f"data-{s:04d}.tar", rows, fsync=False)
        write_index(tars / f"data-{s:04d}.tar", info.offsets)
        entries.append(ShardEntry(f"data-{s:04d}.tar", per, info.bytes, info.checksum))
    write_manifest(tars, Manifest(entries, chunk_size=per))
    write_nv_meta(tars, {e.path: e.samples for e in entries}, ["jpg", "json", "txt"])
    crude = root / "energon"  # the same tars, described as crude samples (members stay bytes)
    crude.mkdir()
    for e in entries:
        for suffix in ("", ".idx"):
            (crude / (e.path + suffix)).symlink_to(tars / (e.path + suffix))
    write_nv_meta(crude, {e.path: e.samples for e in entries}, ["json"])
    _make_peer_copies(root, tars)
    (root / "done.json").write_text(json.dumps(done))
    return root


def _make_peer_copies(root: Path, tars: Path) -> None:
    """The MDS and litdata copies of the shards that are not there yet (each written whole, then renamed
    into place, so a killed run leaves none half-made)."""
    for name, fn in (("mds", _make_mds), ("litdata", _make_litdata)):
        if (root / name).exists():
            continue
        part = root / f"{name}.part"
        shutil.rmtree(part, ignore_errors=True)
        try:
            fn(part, tars)
        except ImportError as err:
            print(f"  ({name} data not made: {err})", file=sys.stderr)
            continue
        part.rename(root / name)


def _iter_tar_samples(tars: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    sys.path.insert(0, str(ROOT / "src"))
    from prep.formats.tar import iter_samples

    for tar in sorted(tars.glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_samples(f, str(tar), read_data=True):
                yield s.key, s.data or {}


def _make_mds(out: Path, tars: Path) -> None:
    _stub_torchvision()
    from streaming import MDSWriter

    with MDSWriter(
        out=str(out),
        columns={"key": "str", "jpg": "bytes", "txt": "str", "json": "str"},
        size_limit=1 << 25,
    ) as w:
        for key, m in _iter_tar_samples(tars):
            w.write({"key": key, "jpg": m["jpg"], "txt": m["txt"].decode(), "json": m["json"].decode()})


def _litdata_row(item: tuple[str, dict[str, bytes]]) -> dict[str, Any]:
    key, m = item
    return {"key": key, "jpg": m["jpg"], "txt": m["txt"].decode(), "json": m["json"].decode()}


def _make_litdata(out: Path, tars: Path) -> None:
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    from litdata.streaming.writer import BinaryWriter

    w = BinaryWriter(str(out), chunk_bytes="32MB")
    for i, item in enumerate(_iter_tar_samples(tars)):
        w.add_item(i, _litdata_row(item))
    w.done()
    w.merge()


def _stub_torchvision() -> None:
    """mosaicml-streaming imports torchvision at import time; no CPU build matches this torch, and the
    benchmark never uses it, so an import-only stand-in is enough."""
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # a missing or mismatched torchvision
        pass
    import importlib.machinery

    for name in (
        "torchvision",
        "torchvision.datasets",
        "torchvision.transforms",
        "torchvision.transforms.functional",
    ):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules["torchvision.datasets"].VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms.functional"].to_tensor = lambda x: x  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- decode
def _decode_jpeg(data: bytes):
    """What every peer's decode mode does per image: PIL decode to an HxWx3 uint8 array."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _peer_decode(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    out["jpg"] = _decode_jpeg(sample["jpg"])
    for k in ("txt", "json"):
        if isinstance(out.get(k), bytes):
            out[k] = out[k].decode()
    return out


def _stack_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np
    import torch

    return {
        "__key__": [s["__key__"] for s in samples],
        "jpg": torch.from_numpy(np.stack([s["jpg"] for s in samples])),
        "txt": [s["txt"] for s in samples],
        "json": [s["json"] for s in samples],
    }


def _raw_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: [s[k] for s in samples] for k in ("__key__", "jpg", "txt", "json")}


# ---------------------------------------------------------------------------------------------- loaders
# Each factory returns (batches: an endless iterator over epochs, state() -> JSON-able or None,
# restore(state) -> None applied before iterating). Keys come back as batch["__key__"].
Factory = Callable[
    [Path, str], tuple[Callable[[], Iterator[dict[str, Any]]], Callable[[], Any], Callable[[Any], None]]
]


def _endless(make_iter: Callable[[], Any]) -> Iterator[Any]:
    while True:
        yield from make_iter()


def loader_prep(root: Path, mode: str):
    from prep.loaders import DataLoader, ShardDataset

    variants: dict[str, dict[str, Any]] = {
        "raw": {"decode": "raw"},
        "decode": {},  # the default call: decode="uint8", native size
        "decode128": {"image_size": RESIZED},
        "pil": {"decode": "raw", "transform": _peer_decode},
    }
    ds = ShardDataset(root / "tars", batch_size=BATCH, seed=SEED, **variants[mode])
    dl = DataLoader(ds, num_workers=WORKERS, persistent_workers=True)
    return (lambda: _endless(lambda: dl)), dl.state_dict, dl.load_state_dict


def _wds_dataset(root: Path, mode: str):
    import webdataset as wds

    urls = [str(p) for p in sorted((root / "tars").glob("*.tar"))]
    ds = wds.WebDataset(
        urls,
        shardshuffle=len(urls),
        detshuffle=True,
        seed=SEED,
        nodesplitter=wds.shardlists.single_node_only,
        empty_check=False,
    )
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=SEED)
    if mode == "decode":
        ds = ds.map(_peer_decode).batched(BATCH, collation_fn=_stack_batch)
    else:
        ds = ds.batched(BATCH, collation_fn=_raw_batch)
    return ds


def loader_webdataset(root: Path, mode: str):
    import webdataset as wds

    dl = wds.WebLoader(
        _wds_dataset(root, mode), batch_size=None, num_workers=WORKERS, persistent_workers=True
    )
    return (lambda: _endless(lambda: dl)), (lambda: None), (lambda s: None)


def loader_torchdata(root: Path, mode: str):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dl = StatefulDataLoader(_wds_dataset(root, mode), batch_size=None, num_workers=WORKERS)
    holder: dict[str, Any] = {}

    def batches():  # one epoch per iter(); StatefulDataLoader replays to reach a restored position
        return _endless(lambda: dl)

    def restore(state):
        holder["s"] = state
        dl.load_state_dict(state)

    return batches, dl.state_dict, restore


def loader_energon(root: Path, mode: str):
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        Sample,
        WorkerConfig,
        basic_sample_keys,
        get_savable_loader,
        get_train_dataset,
        stateless,
    )

    @dataclasses.dataclass
    class BenchSample(Sample):
        jpg: Any
        txt: Any
        json: Any

    @stateless
    def cook(sample: dict[str, Any]) -> Sample:
        s = {"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample["txt"], "json": sample["json"]}
        if mode == "decode":
            s = _peer_decode(s)
        return BenchSample(**basic_sample_keys(sample), jpg=s["jpg"], txt=s["txt"], json=s["json"])

    class Encoder(DefaultTaskEncoder):
        decoder = None  # members stay bytes; decode mode decodes in the cooker like every other peer
        cookers = (Cooker(cook),)

        @stateless
        def batch(self, samples):
            rows = [{"__key__": x.__key__, "jpg": x.jpg, "txt": x.txt, "json": x.json} for x in samples]
            return _stack_batch(rows) if mode == "decode" else _raw_batch(rows)

    wc = WorkerConfig(rank=0, world_size=1, num_workers=WORKERS)
    ds = get_train_dataset(
        root / "energon",
        worker_config=wc,
        batch_size=BATCH,
        shuffle_buffer_size=SHUFFLE_BUFFER,
        max_samples_per_sequence=100,
        task_encoder=Encoder(),
    )
    dl = get_savable_loader(ds, worker_config=wc)
    holder: dict[str, Any] = {"dl": dl}

    def restore(state):
        holder["dl"].restore_state_rank(state)

    return (lambda: iter(holder["dl"])), (lambda: holder["dl"].save_state_rank()), restore


def loader_streaming(root: Path, mode: str):
    _stub_torchvision()
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()

    class DS(StreamingDataset):
        def __getitem__(self, idx):
            row = super().__getitem__(idx)
            s = {"__key__": row["key"], "jpg": row["jpg"], "txt": row["txt"], "json": row["json"]}
            return _peer_decode(s) if mode == "decode" else s

    ds = DS(local=str(root / "mds"), shuffle=True, shuffle_seed=SEED, batch_size=BATCH)
    dl = StreamingDataLoader(
        ds,
        batch_size=BATCH,
        num_workers=WORKERS,
        collate_fn=_stack_batch if mode == "decode" else _raw_batch,
        persistent_workers=True,
    )
    return (lambda: _endless(lambda: dl)), dl.state_dict, dl.load_state_dict


def loader_litdata(root: Path, mode: str):
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    from litdata import StreamingDataLoader, StreamingDataset

    class DS(StreamingDataset):
        def __getitem__(self, idx):
            row = super().__getitem__(idx)
            s = {"__key__": row["key"], "jpg": row["jpg"], "txt": row["txt"], "json": row["json"]}
            return _peer_decode(s) if mode == "decode" else s

    ds = DS(str(root / "litdata"), shuffle=True, seed=SEED)
    dl = StreamingDataLoader(
        ds, batch_size=BATCH, num_workers=WORKERS, collate_fn=_stack_batch if mode == "decode" else _raw_batch
    )
    return (lambda: _endless(lambda: dl)), dl.state_dict, dl.load_state_dict


FACTORIES: dict[str, Factory] = {
    "prep": loader_prep,
    "webdataset": loader_webdataset,
    "torchdata": loader_torchdata,
    "energon": loader_energon,
    "streaming": loader_streaming,
    "litdata": loader_litdata,
}
REPLAYS = {"torchdata", "energon"}  # resume by replaying (re-reading) every batch before the saved one
NO_RESUME = {"webdataset"}


# ------------------------------------------------------------------------------------ child processes
PREP_ONLY = {"decode128", "pil"}  # prep's variants of decode mode (peers: raw and decode)
CEILINGS = {  # name -> (what, the prep mode measured against it)
    "simplejpeg": ("simplejpeg decode alone, native 256x256, into one reused array (ceiling)", "decode"),
    "simplejpeg_rows": ("simplejpeg decode alone, native 256x256, into batch rows (like-for-like ceiling)",
                        "decode"),
    "simplejpeg128": (f"simplejpeg decode alone, DCT-scaled to {RESIZED}x{RESIZED}, into one reused array "
                      "(ceiling)", "decode128"),
    "simplejpeg128_rows": (f"simplejpeg decode alone, DCT-scaled to {RESIZED}x{RESIZED}, into batch rows "
                           "(like-for-like ceiling)", "decode128"),
    "pil": ("PIL decode alone (PIL ceiling)", "pil"),
}


def child_throughput(root: Path, name: str, mode: str, batches: int, warmup: int) -> dict[str, Any]:
    make, _, _ = FACTORIES[name](root, mode)
    it = make()
    for _ in range(warmup):
        next(it)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += len(b["__key__"])
    dt = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {"samples_per_s": n / dt, "samples": n, "seconds": dt, "cpu_us_per_sample": cpu / n * 1e6}


_JPEGS: list[bytes] = []  # the ceiling's input, read before its processes fork


def child_ceiling(root: Path, decoder: str, per_process: int) -> dict[str, Any]:
    """The decoder alone in WORKERS processes on JPEG bytes in memory: the most any loader can decode on
    these cores. Samples/s over the span from the first process's start to the last one's end."""
    import itertools
    import multiprocessing

    import torch  # noqa: F401  # as in every loader's process: with torch loaded, Pillow decodes ~1.8x faster

    _JPEGS[:] = [m["jpg"] for _, m in itertools.islice(_iter_tar_samples(root / "tars"), 2000)]
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        runs = pool.starmap(_ceiling_worker, [(decoder, per_process, w) for w in range(WORKERS)])
    n = sum(r[3] for r in runs)
    span = max(r[1] for r in runs) - min(r[0] for r in runs)
    return {"samples_per_s": n / span, "cpu_us_per_sample": sum(r[2] for r in runs) / n * 1e6}


_ROW_SLOTS = 6  # batch buffers a rows ceiling cycles through, as many as one prep worker keeps


def _ceiling_worker(decoder: str, count: int, offset: int) -> tuple[float, float, float, int]:
    """One ceiling process. The plain ceilings decode every image into one reused array, which stays in
    the core's L2 cache; the `_rows` ones decode image i into row i % 32 of a 32-row shared-memory batch
    buffer (6 cycled, pages faulted in beforehand), what a loader must write to hand out batches of
    distinct images: 6 MiB a batch at 256x256, more than the L2 holds."""
    import simplejpeg
    import torch

    side = RESIZED if decoder.startswith("simplejpeg128") else 256
    rows = decoder.endswith("_rows")
    bufs = [torch.zeros((BATCH if rows else 1, side, side, 3), dtype=torch.uint8).share_memory_().numpy()
            for _ in range(0 if decoder == "pil" else _ROW_SLOTS if rows else 1)]  # PIL makes its own
    scale = {"min_height": RESIZED, "min_width": RESIZED} if side == RESIZED else {}

    def decode(b: bytes, i: int) -> Any:
        if decoder == "pil":
            return _decode_jpeg(b)
        out = bufs[i // BATCH % len(bufs)][i % BATCH] if rows else bufs[0][0]
        return simplejpeg.decode_jpeg(b, colorspace="RGB", buffer=out, **scale)

    for i, b in enumerate(_JPEGS[:20]):  # warm-up
        decode(b, i)
    jpegs = _JPEGS[offset::WORKERS]
    t0, c0 = time.time(), time.process_time()
    for i in range(count):
        decode(jpegs[i % len(jpegs)], i)
    return t0, time.time(), time.process_time() - c0, count


def _cpu_seconds() -> float:
    """CPU time of this process and its descendants (the loader's workers): on a shared machine, CPU
    per sample says more about a loader's cost than wall-clock throughput does. Each process's reaped
    children count too (`children_user`/`children_system`): a worker that exits between two readings
    would otherwise take its CPU time with it (a litdata round once read -15 us/sample)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def child_first(root: Path, name: str, mode: str) -> dict[str, Any]:
    """A fresh loader's first batch: building the loader (index, state) plus starting its workers."""
    _import(name)  # module import time is not start-up time
    _settle_gc()
    t0 = time.perf_counter()
    make, _, _ = FACTORIES[name](root, mode)
    next(make())
    return {"seconds": time.perf_counter() - t0}


def _settle_gc() -> None:
    """Run the full collection the imports left due (for every loader alike). After torch's import the
    heap has grown past the GC's 25% rule, so its next allocations trigger a collection of the whole heap
    (~0.13 s on this machine): part of the import's cost, which would otherwise land inside whichever
    loader's first-batch window happened to allocate next."""
    import gc

    gc.collect()


def child_resume_save(root: Path, name: str, k: int, out: Path) -> dict[str, Any]:
    import pickle

    make, state, _ = FACTORIES[name](root, "raw")
    it = make()
    for _ in range(k):
        next(it)
    saved = state()
    ref = [list(next(it)["__key__"]) for _ in range(NEXT)]
    out.write_bytes(pickle.dumps({"state": saved, "ref": ref}))  # our own file, read back by our own child
    return {}


def child_resume_load(root: Path, name: str, mode: str, out: Path) -> dict[str, Any]:
    import pickle

    doc = pickle.loads(out.read_bytes())
    _import(name)  # module import time is not resume time
    _settle_gc()
    t0 = time.perf_counter()
    make, _, restore = FACTORIES[name](root, mode)
    restore(doc["state"])
    it = make()
    first = list(next(it)["__key__"])
    dt = time.perf_counter() - t0
    got = [first] + [list(next(it)["__key__"]) for _ in range(NEXT - 1)]
    return {"seconds": dt, "exact": got == doc["ref"]}


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process (own session); afterwards kill what it left behind (some
    loaders' worker pools outlive their parent)."""
    import signal

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "LITDATA_DISABLE_VERSION_CHECK": "1"},
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("RESULT ")]
        if rc is None:
            return {"error": f"timed out after {timeout:.0f} s"}
        if rc != 0 or not lines:
            tail = (err.read().strip().splitlines() or ["no output"])[-1]
            return {"error": tail[:160]}
    return json.loads(lines[-1][7:])


MODULES = {
    "prep": "prep.loaders",
    "webdataset": "webdataset",
    "torchdata": "torchdata.stateful_dataloader",
    "energon": "megatron.energon",
    "streaming": "streaming",
    "litdata": "litdata",
}


def _import(name: str) -> None:
    import importlib

    if name == "streaming":
        _stub_torchvision()
    importlib.import_module(MODULES[name])
    importlib.import_module("webdataset" if name == "torchdata" else MODULES[name])


def available(name: str) -> str | None:
    import importlib.util

    try:
        return (
            None if importlib.util.find_spec(MODULES[name]) is not None else f"{MODULES[name]} not installed"
        )
    except ModuleNotFoundError:
        return f"{MODULES[name]} not installed"


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--raw-batches", type=int, default=600, help="timed batches per raw run (~1 s for prep)")
    ap.add_argument("--decode-batches", type=int, default=450,
                    help="timed batches per decode run: ~4 s of CPU for prep, so the 10 ms ticks of the "
                         "CPU times read are under 1%% of it; with the warm-up, inside one epoch (625)")
    ap.add_argument("--warmup", type=int, default=150,
                    help="batches taken before timing: enough that each worker has made its steady-state "
                         "buffers (prep's shared-memory slots: up to six per worker, the last ones up to "
                         "~20 requests in, ~8 ms each to create and fault in at 256x256)")
    ap.add_argument("--resume-samples", type=int, default=1_000_000, help="samples of the resume index")
    ap.add_argument("--resume-k", default="300,3000,30000", help="K values for loaders that seek")
    ap.add_argument("--replay-k", default="300,600", help="K values for loaders that replay (slow by design)")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--modes", default="raw,decode,decode128,pil,first,resume")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "prep-bench-loaders")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 samples, 1 repeat, small K")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))  # measure this checkout's prep, not whichever one is installed
    if a.child:
        kind, name, *rest = a.child
        root = Path(rest[0])
        if kind == "throughput":
            res = child_throughput(root, name, rest[1], int(rest[2]), int(rest[3]))
        elif kind == "ceiling":
            res = child_ceiling(root, name, int(rest[1]))
        elif kind == "first":
            res = child_first(root, name, rest[1])
        elif kind == "cleanup":  # streaming's shared memory, left by its children (killed after measuring)
            res = {"removed": _clean_streaming_shm(float(rest[1]))}
        elif kind == "save":
            res = child_resume_save(root, name, int(rest[1]), Path(rest[2]))
        else:
            res = child_resume_load(root, name, rest[1], Path(rest[2]))
        print("RESULT " + json.dumps(res), flush=True)
        os._exit(0)  # some peers' worker pools linger at exit; the result is already out
    if a.quick:
        a.samples, a.shards, a.repeats, a.raw_batches, a.decode_batches, a.warmup = 2000, 4, 1, 40, 20, 10
        a.resume_samples, a.resume_k, a.replay_k = 20000, "30,120,600", "30,60"
    names = [n for n in a.loaders.split(",") if n]
    modes = a.modes.split(",")
    data = a.data / f"{a.samples}x{a.shards}"
    t0 = time.perf_counter()
    started = time.time()
    make_data(data, a.samples, a.shards)
    resume_shards = max(1, a.resume_samples // 10_000)
    big = a.data / f"{a.resume_samples}x{resume_shards}-16px"
    if "resume" in modes:
        make_data(big, a.resume_samples, resume_shards, image=16)
    from prep.loaders.io.images import jpeg_backend

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"data: {a.samples} samples of 256x256 JPEG q90 + txt + json in {a.shards} tars "
        f"({_du(data / 'tars') / 2**20:.0f} MiB), {WORKERS} workers, batch {BATCH}, shuffle on; "
        f"prep JPEG decoder: {jpeg_backend()}; peers decode with PIL; medians of {a.repeats}; "
        f"load average at start {_load()}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {n: {} for n in names}
    for n in names:
        why = available(n)
        if why:
            results[n]["missing"] = why
            print(f"  {n}: skipped ({why})", flush=True)
    live = [n for n in names if "missing" not in results[n]]
    ceilings: dict[str, Any] = {}
    jobs: list[tuple[str, list[str]]] = []  # (label, child args), run round robin `repeats` times
    if "raw" in modes:
        jobs += [(f"{n}/raw", ["throughput", n, str(data), "raw", str(a.raw_batches), str(a.warmup)])
                 for n in live]
    for mode in ("decode", "decode128", "pil"):
        if mode not in modes:
            continue
        per_process = a.decode_batches * BATCH  # twice a loader run's share: the ceiling is quick
        jobs += [(f"ceiling/{c}", ["ceiling", c, str(data), str(per_process)])
                 for c, (_, m) in CEILINGS.items() if m == mode]
        jobs += [(f"{n}/{mode}", ["throughput", n, str(data), mode, str(a.decode_batches), str(a.warmup)])
                 for n in live if mode not in PREP_ONLY or n == "prep"]
    if "first" in modes:
        jobs += [(f"{n}/first", ["first", n, str(data), "decode"]) for n in live]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in jobs}
    for _ in range(a.repeats):  # round robin, so a load change on this shared machine hits everything
        for label, args in jobs:
            if args[0] != "ceiling":
                _warm_page_cache(data)
            runs[label].append(run_child(args, 600))
    for label, got in runs.items():
        who, mode = label.split("/")
        key = "seconds" if mode == "first" else "samples_per_s"
        ok = [r[key] for r in got if key in r]
        cpu = [r["cpu_us_per_sample"] for r in got if "cpu_us_per_sample" in r]
        entry = ceilings.setdefault(mode, {}) if who == "ceiling" else results[who]
        prefix = "" if who == "ceiling" else f"{mode}_"
        entry[f"{prefix}value" if who == "ceiling" else mode] = (
            statistics.median(ok) if ok else got[-1].get("error")
        )
        if cpu:
            entry[f"{prefix}cpu_us"] = statistics.median(cpu)
        shown = [f"{r[key]:.3f}" if mode == "first" and key in r else _fmt(r.get(key, r.get("error")))
                 for r in got]
        cpus = f"; CPU us/sample {', '.join(_fmt(c) for c in cpu)}" if cpu else ""
        print(f"  {label:22s} runs: {', '.join(shown)}{cpus}", flush=True)
    if "resume" in modes:
        for n in live:
            if n in NO_RESUME:
                results[n]["resume"] = "no resume"
                continue
            ks = [int(k) for k in (a.replay_k if n in REPLAYS else a.resume_k).split(",")]
            out = []
            for k in ks:
                state_file = big / f"state-{n}-{k}.pkl"
                saved = run_child(["save", n, str(big), str(k), str(state_file)], 1800)
                load = ["load", n, str(big), "decode", str(state_file)]
                loads = [saved] if "error" in saved else [run_child(load, 900) for _ in range(a.repeats)]
                secs = [r["seconds"] for r in loads if "seconds" in r]
                point: dict[str, Any] = {"k": k}
                if secs:
                    point.update(seconds=statistics.median(secs), runs=secs,
                                 exact=all(r.get("exact") for r in loads))
                else:
                    point["error"] = loads[-1].get("error", "?")
                out.append(point)
                print(f"  {n:10s} resume K={k}: {point}", flush=True)
            results[n]["resume"] = out
    if "streaming" in live:
        run_child(["cleanup", "streaming", str(data), str(started)], 120)
    _pair_with_ceilings(runs, results)
    _table(results, ceilings, names, a.resume_samples, time.perf_counter() - t0)
    _record(runs, results, f"{a.samples:,} x 256x256 JPEG q90 + txt + json in {a.shards} tars, "
                           f"{WORKERS} workers, batch {BATCH}; resume on {a.resume_samples:,} samples")
    if a.json:
        a.json.write_text(json.dumps({"loaders": results, "ceilings": ceilings}, indent=1, default=str))


_STREAMING_SHM = re.compile(
    r"^\d{6}_(barrier|cache_usage|locals|next_epoch|resume|shard_access_times|shard_states|filelock)"
)


def _clean_streaming_shm(since: float) -> int:
    """Remove the /dev/shm files mosaicml-streaming made during this run (its own cleaner only handles
    segments whose creator exited normally)."""
    shm = Path("/dev/shm")
    removed = 0
    for f in shm.iterdir() if shm.is_dir() else []:
        if _STREAMING_SHM.match(f.name) and f.stat().st_mtime >= since - 1:
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def _load() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was (other work included)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _warm_page_cache(data: Path) -> None:
    """Read every data file once, so each loader reads from a warm page cache as the ceilings read from
    memory. A VM may reclaim cold page cache in the background (DAMON): the first round here read 14%
    more CPU per sample than the next four, the disk reads of the shards the ceilings never touch."""
    for f in sorted(data.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.tar"))


def _fmt(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, float) else str(v)


def _pair_with_ceilings(runs: dict[str, list[dict[str, Any]]], results: dict[str, dict[str, Any]]) -> None:
    """Each loader's share of its decoder's ceiling, round by round: a round measures the ceiling and the
    loaders within a minute or two, so a load change on this shared machine (it moves both by 20-30%
    between runs) hits both sides of a round's ratio alike. The median of the rounds' ratios is the
    figure of merit; the medians of samples/s alone mix rounds taken under different loads."""
    for c, (_, mode) in CEILINGS.items():
        ceil = runs.get(f"ceiling/{c}")
        if not ceil:
            continue
        for label, got in runs.items():
            who, m = label.split("/")
            if who == "ceiling":
                continue
            if who == "prep" and m != mode:
                continue  # each of prep's modes against its own decoder
            if who != "prep" and (mode, m) != ("pil", "decode"):
                continue  # the peers decode with PIL
            pairs = [(r, k) for r, k in zip(got, ceil, strict=True)
                     if "samples_per_s" in r and "samples_per_s" in k]
            if not pairs:
                continue
            speed = [r["samples_per_s"] / k["samples_per_s"] for r, k in pairs]
            cpu = [k["cpu_us_per_sample"] / r["cpu_us_per_sample"] for r, k in pairs]
            results[who][f"{c}_share"] = {
                "samples_per_s": statistics.median(speed), "cpu": statistics.median(cpu),
                "rounds": [[round(x, 3), round(y, 3)] for x, y in zip(speed, cpu, strict=True)],
            }
            print(f"  {label:22s} share of ceiling/{c} by round (samples/s, CPU): "
                  + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(speed, cpu, strict=True)), flush=True)


def _record(runs: dict[str, list[dict[str, Any]]], results: dict[str, dict[str, Any]], data: str) -> None:
    """The measurements for `make bench`'s report: every run of each task, the ceilings as their own
    'who', so the report's ratios read as shares of them."""
    sys.path.insert(0, str(ROOT))
    from bench._report import Measure, record

    tasks = {"raw": "raw batches", "decode": "decode, native size", "decode128": f"decode to {RESIZED}px",
             "pil": "PIL decode", "first": "first batch, fresh"}
    ceiling_task = {c: mode for c, (_, mode) in CEILINGS.items()}
    measures = []
    for label, got in runs.items():
        who, mode = label.split("/")
        task = tasks[ceiling_task[mode] if who == "ceiling" else mode]
        if who == "ceiling":
            who = f"{mode} alone (ceiling)"
        key = "seconds" if mode == "first" else "samples_per_s"
        values = [r[key] for r in got if key in r]
        if values:
            measures.append(Measure(task, who, "s" if mode == "first" else "samples/s", values,
                                    higher_is_better=mode != "first"))
    for who, r in results.items():
        for point in r.get("resume") or []:
            if isinstance(point, dict) and "seconds" in point:
                measures.append(Measure(f"resume at batch {point['k']:,}", who, "s", point["runs"]))
    notes = [f"{who} {c}: share of the ceiling, median of the rounds' ratios: samples/s "
             f"{share['samples_per_s']:.2f}, CPU {share['cpu']:.2f}"
             for who, r in results.items() for c in CEILINGS if (share := r.get(f"{c}_share"))]
    record("loaders", "Loaders: decode against the decoder's ceiling, first batch, resume", data, measures,
           notes)


def _table(
    results: dict[str, dict[str, Any]], ceilings: dict[str, Any], names: list[str], big: int, wall: float
) -> None:
    """Decode against the ceilings, raw throughput, then first-batch times."""
    print("\n| what | samples/s | CPU us/sample (main + workers) | share of its ceiling: samples/s, CPU "
          "(median of the rounds' ratios) |")
    print("|---|---:|---:|---:|")
    labels = {
        "decode": 'prep, decode="uint8" (default call: native size, channels_last)',
        "decode128": f'prep, decode="uint8", image_size={RESIZED}',
        "pil": "prep, raw bytes + PIL decode in a transform",
    }
    for c, (what, mode) in CEILINGS.items():
        ceil = ceilings.get(c, {}).get("value")
        if ceil is None:
            continue
        ceil_cpu = ceilings[c].get("cpu_us")
        print(f"| {what}, {WORKERS} processes, bytes in memory | {_fmt(ceil)} | {_fmt(ceil_cpu)} "
              "| 1.00, 1.00 |")
        rows = [("prep", labels[mode], mode)]
        if mode == "pil":
            rows += [(n, f"{n} with PIL", "decode") for n in names if n != "prep"]
        for n, label, m in rows:
            v = results.get(n, {}).get(m)
            share = results.get(n, {}).get(f"{c}_share")
            if isinstance(v, float) and share:
                cpu = results[n].get(f"{m}_cpu_us")
                print(f"| {label} | {_fmt(v)} | {_fmt(cpu)} | "
                      f"{share['samples_per_s']:.2f}, {share['cpu']:.2f} |")
            elif v is not None:
                print(f"| {label} | {v} | | |")
    print("\n| loader | raw samples/s | raw CPU us/sample |")
    print("|---|---:|---:|")
    for n in names:
        r = results[n]
        if "missing" in r:
            print(f"| {n} | {r['missing']} | |")
        elif "raw" in r:
            print(f"| {n} | {_fmt(r['raw'])} | {_fmt(r.get('raw_cpu_us', '?'))} |")
    print(f"\n| loader | first batch, fresh (s) | resume, {big:,}-sample index: K -> first batch s, exact |")
    print("|---|---:|---|")
    for n in names:
        r = results[n]
        if "missing" in r:
            continue
        res = r.get("resume")
        rs = (
            ", ".join(
                f"K={x['k']}: "
                + (f"{x['seconds']:.3f} {'exact' if x['exact'] else 'NOT exact'}" if "seconds" in x
                   else x["error"])
                for x in res
            )
            if isinstance(res, list)
            else (res or "")
        )
        first = r.get("first")
        print(f"| {n} | {f'{first:.3f}' if isinstance(first, float) else (first or '')} | {rs} |")
    peers = {n: r["decode"] for n, r in results.items() if n != "prep" and isinstance(r.get("decode"), float)}
    mine = results.get("prep", {}).get("decode")
    if isinstance(mine, float) and peers:
        best = max(peers, key=lambda n: peers[n])
        print(f"decode: prep default {mine:,.0f} vs fastest peer {best} {peers[best]:,.0f} samples/s -> "
              f"{mine / peers[best]:.2f}x")
    print(f"total wall time {wall:.0f} s; load average at end {_load()} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
