"""Planning cost per training step against the world size (issue 19, part 1).

What a rank's training process does on its main thread for every step: the root plans the next global
batch (`next_batch`), the loader snapshots the tree's state (`state_dict`, kept until the batch is
consumed), and the descriptor is pickled for a worker. Measured for a ShardDataset alone and for a
two-source blend of them, per-rank batch 32, at world sizes 1 to 4,096; `resolve` is the worker's
share: the references of one rank's slice (rank W/2), computed from the descriptor.

The dataset is a manifest of 4,096 shards x 1,000 samples (planning reads no tar, so none is written).
Target (issue 19): flat in the world size, <= 0.3 ms per step at 1,024 ranks.

Run: `PYTHONPATH=src python bench/planning.py`; point PYTHONPATH at another checkout to compare.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from prep.formats.manifest import Manifest, ShardEntry, write_manifest
from prep.loaders import BlendDataset, MixBatchDataset, ShardDataset, base
from prep.loaders.base import Node, rank_slice

slice_refs = getattr(base, "slice_refs", None)

WORLDS = [1, 8, 64, 128, 1024, 4096]
PER_RANK = 32


def make_manifest(root: Path, shards: int, per_shard: int) -> Path:
    entries = [ShardEntry(f"shard-{i:06d}.tar", per_shard, per_shard * 20_000, "xxh3_128:0")
               for i in range(shards)]
    write_manifest(root, Manifest(entries))
    return root


def build(root: Path, kind: str, world: int) -> Node:
    def leaf(seed: int) -> ShardDataset:
        return ShardDataset(root, batch_size=PER_RANK, rank=0, world_size=world, seed=seed, decode="raw")

    if kind == "shard":
        return leaf(0)
    if kind == "blend":
        return BlendDataset((leaf(0), 0.7), (leaf(1), 0.3), seed=0)
    counts = "stratified" if kind == "mix-strat" else "multinomial"
    return MixBatchDataset((leaf(0), 0.5), (leaf(1), 0.3), (leaf(2), 0.2), batch_size=PER_RANK,
                           counts=counts, seed=0, world_size=world)


def step_costs(root: Path, kind: str, world: int, steps: int) -> tuple[float, float, int]:
    """(median ms of plan + snapshot + pickle, median ms of one rank's resolve, pickled bytes)."""
    node = build(root, kind, world)
    node.bind("")
    worker = pickle.loads(pickle.dumps(node))  # what a DataLoader worker holds
    lookup = worker.nodes()
    plan, resolve, size = [], [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            desc = node.next_batch()
        except StopIteration:  # the epoch ended (4,096 ranks x 32 take 131,072 samples a step)
            desc = node.next_batch()
        node.state_dict()
        blob = pickle.dumps(desc)
        t1 = time.perf_counter()
        got = pickle.loads(blob)
        while isinstance(lookup[got.node], BlendDataset):
            got = got.items[1]  # a blend's descriptor wraps its source's
        t2 = time.perf_counter()
        if slice_refs is None:  # a checkout from before spans: the references are in the descriptor
            list(got.items[rank_slice(len(got.items), world // 2, world)])
        else:
            slice_refs(lookup[got.node], got.items, world // 2, world)
        t3 = time.perf_counter()
        plan.append(t1 - t0)
        resolve.append(t3 - t2)
        size = max(size, len(blob))
    return statistics.median(plan) * 1e3, statistics.median(resolve) * 1e3, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--trees", default="shard,blend,mix,mix-strat",
                    help="comma-separated: shard, blend, mix (multinomial), mix-strat (stratified)")
    ap.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_manifest(Path(tmp), 4096, 1000)
        print(f"{'tree':<9} {'world':>6} {'plan+state+pickle ms':>21} {'resolve ms':>11} {'desc bytes':>11}")
        for kind in args.trees.split(","):
            for world in map(int, args.worlds.split(",")):
                plan, resolve, size = step_costs(root, kind, world, args.steps)
                print(f"{kind:<9} {world:>6} {plan:>21.3f} {resolve:>11.3f} {size:>11}", flush=True)


if __name__ == "__main__":
    main()
