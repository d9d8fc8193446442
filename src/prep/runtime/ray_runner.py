"""`--runner ray`: the same tasks as the local pool, run as Ray tasks on a cluster or on local Ray.

With `--ray-address ADDR` (or RAY_ADDRESS, as set inside `ray job submit`) the driver joins that
cluster; with neither it starts Ray on this machine. A Ray already initialised by the caller is used
as is and left running. Tasks are idempotent, so Ray may retry one whose worker died; a task that
still cannot finish becomes a failed result instead of aborting the other tasks.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from collections.abc import Callable
from typing import Any

from prep.errors import PrepError
from prep.stages.base import RunOptions, Task, TaskResult

SYSTEM_RETRIES = 2  # re-runs of a task whose worker process or node died


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _task_id(args: tuple[Any, ...]) -> str | None:
    return next((a.id for a in args if isinstance(a, Task)), None)


class RayExecutor:
    """`submit(fn, *args) -> Future` and `shutdown()`, like concurrent.futures executors."""

    def __init__(self, opts: RunOptions, gpus_per_task: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise PrepError("--runner ray needs Ray, which is not installed", "--runner",
                            "pip install 'prep[ray]' (or use --runner local)") from None
        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            address = opts.ray_address or os.environ.get("RAY_ADDRESS")
            num_cpus = opts.workers if address is None and opts.workers > 1 else None
            try:
                ray.init(address=opts.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                         num_cpus=num_cpus)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise PrepError(f"cannot start or reach Ray ({err})", f"--ray-address {address or '(local)'}",
                                "start the cluster (`ray start --head`) and pass its address, e.g. "
                                "--ray-address auto or ray://HOST:10001") from None
            self._owned = True
        # Ray gives a GPU of its own only to a task that asks for one (the others see every GPU of the
        # node, so all took cuda:0; with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO they see none); a task that
        # asks on a cluster without GPUs would wait forever, so GPUs are asked for only where there are
        gpus = gpus_per_task if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self._remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=SYSTEM_RETRIES)(_call)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        out: cf.Future = cf.Future()
        task_id = _task_id(args)

        def settle(done: cf.Future) -> None:
            try:
                out.set_result(done.result())
            except Exception as err:  # the worker or node died beyond retries, or Ray itself failed
                if task_id is None:
                    out.set_exception(err)
                else:
                    out.set_result(TaskResult(task_id, "failed", error=f"Ray: {type(err).__name__}: {err}"))

        self._remote.remote(fn, *args).future().add_done_callback(settle)
        return out

    def shutdown(self) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False
