"""torch.distributed plumbing for pipeline runs (torchrun / Slurm start the processes).

Kept to what the orchestrator needs, on torch.distributed directly: the process group from torchrun's
environment, DDP around the modules a step trains (re-wrapped every step: freeze sets change), metric
averaging across ranks, and one decision (which checkpoint) broadcast from rank 0. prep's DataLoader
is never handed to a wrapper (accelerate's `prepare` would re-shard it and lose exact resume): each
rank's loader already loads its own slice of the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


_STARTED_GROUP = False  # whether `init` started the process group (then `leave` ends it, not the caller's)


def init(device: Any) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once; (0, 1) otherwise."""
    global _STARTED_GROUP
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not td.is_available():
        return Dist(0, 1)
    backend = "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"
    td.init_process_group(backend=backend)
    _STARTED_GROUP = True
    return Dist(td.get_rank(), td.get_world_size())


def leave(dist: Dist) -> None:
    """End the process group `init` started, once every rank has got here. A rank that exits with the
    group alive tears it down while the others may still be talking to it; with gloo that aborted a
    rank now and then ("terminate called without an active exception", exit -6) after a run that had
    finished its work. A group the caller started is left to the caller."""
    global _STARTED_GROUP
    if dist.world == 1 or not _STARTED_GROUP:
        return
    import torch.distributed as td

    td.barrier()
    td.destroy_process_group()
    _STARTED_GROUP = False


def average(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """The mean of each metric over ranks (every rank gets the same numbers, so every rank takes the
    same transition decisions). Keys must be the same on every rank."""
    if dist.world == 1 or not values:
        return values
    import torch
    import torch.distributed as td

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    return {k: float(v) / dist.world for k, v in zip(keys, t.tolist(), strict=True)}


def gather(obj: Any, dist: Dist) -> list[Any]:
    if dist.world == 1:
        return [obj]
    import torch.distributed as td

    out: list[Any] = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, dist: Dist) -> Any:
    if dist.world == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def wrap(module: Any, dist: Dist, device: Any) -> Any:
    """DDP around a module with trainable parameters (other modules are returned as they are)."""
    if dist.world == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if getattr(device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
