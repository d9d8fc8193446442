"""A pipeline run ends the gloo process group it started (every rank waits for the others first), and
leaves alone a group its caller started: a rank exiting with the group alive aborted now and then."""

from __future__ import annotations

import os

import torch.distributed as td
import torch.multiprocessing as mp

from prep.pipeline import distributed
from prep.testing.servers import free_port


def _rank(rank: int, port: int, caller_starts: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      GLOO_SOCKET_IFNAME="lo")
    if caller_starts:
        td.init_process_group("gloo")
    dist = distributed.init("cpu")
    distributed.barrier(dist)
    distributed.leave(dist)
    out[rank] = (dist.world, td.is_initialized())
    if td.is_initialized():
        td.destroy_process_group()


def _run(caller_starts: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(free_port(), caller_starts, out), nprocs=2, start_method="fork")
        return dict(out)


def test_a_group_the_run_started_is_ended_on_every_rank():
    assert _run(caller_starts=False) == {0: (2, False), 1: (2, False)}


def test_a_group_the_caller_started_is_left_to_the_caller():
    assert _run(caller_starts=True) == {0: (2, True), 1: (2, True)}


def test_a_single_process_run_has_no_group_to_leave():
    dist = distributed.init("cpu")
    distributed.leave(dist)
    assert dist.world == 1 and not td.is_initialized()
