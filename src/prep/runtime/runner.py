"""Run one stage: plan, slice, skip finished tasks, execute the rest, write markers, finalize, summarise.

Tasks go to a local process pool by default (`--workers N`), run in-process with one worker, or to
Ray with `--runner ray`. Every task's outcome is recorded; a failure never hides behind a success.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from prep.errors import PrepError, unexpected_line
from prep.formats.atomic import remove_dead_temps, remove_stale_temps, temp_name, write_text_atomic
from prep.runtime.markers import (
    describe_outputs,
    finalize_digest,
    finalized_already,
    folder_listing,
    read_valid_marker,
    record_rewrites,
    write_finalized,
    write_marker,
)
from prep.runtime.progress import task_progress
from prep.stages import get_stage
from prep.stages.base import (
    POOL_WORKER_ENV,
    RunOptions,
    Task,
    TaskResult,
    marker_dir,
    slice_tasks,
    torchrun_slice,
)


@dataclass
class StageRun:
    """The outcome of one `prep run STAGE` (one slice of it, under Slurm arrays)."""

    stage: str
    planned: int
    results: list[TaskResult] = field(default_factory=list)
    finalize_notes: list[str] = field(default_factory=list)
    finalized: bool = False
    waiting_for_other_slices: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    finalize_skipped: bool = False  # finalize had run for this very plan and its files are unchanged

    @property
    def nothing_to_do(self) -> bool:
        """Every task was done already and finalize had nothing to add: the run did no work."""
        return bool(self.results) and all(r.status == "skipped" for r in self.results) and (
            self.finalize_skipped or self.waiting_for_other_slices)

    @property
    def failed(self) -> list[TaskResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors

    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.counts)
        return dict(total)

    def samples_done(self) -> int:
        """Samples out of the tasks this run did: the rate's numerator (a skipped task's counts describe
        an earlier run's work, so a resumed run would otherwise claim that work in its own time)."""
        return sum(r.counts.get("samples_out", r.counts.get("samples", 0)) for r in self.results
                   if r.status == "done")

    def dropped(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.dropped)
        return dict(total)

    def grouped_errors(self) -> list[str]:
        """The errors, each distinct task error once with how many tasks failed with it (a full disk or a
        bad output folder fails every task alike), then the stage's own."""
        by_error: dict[str, list[str]] = {}
        for r in self.failed:
            by_error.setdefault(str(r.error), []).append(r.task_id)
        return [f"{ids[0]}: {err}" + (f" (× {len(ids):,} tasks, {ids[0]} … {ids[-1]})" if ids[1:] else "")
                for err, ids in by_error.items()] + self.errors

    def to_json(self) -> dict[str, Any]:
        by_status = Counter(r.status for r in self.results)
        return {
            "stage": self.stage, "ok": self.ok, "tasks_planned": self.planned,
            "tasks_in_slice": len(self.results), "done": by_status["done"], "skipped": by_status["skipped"],
            "failed": by_status["failed"], "counts": self.counts(), "samples_done": self.samples_done(),
            "dropped": self.dropped(),
            "seconds": round(self.seconds, 3), "finalized": self.finalized,
            "waiting_for_other_slices": self.waiting_for_other_slices, "nothing_to_do": self.nothing_to_do,
            "notes": [n for r in self.results for n in r.notes] + self.finalize_notes,
            "errors": [f"{r.task_id}: {r.error}" for r in self.failed] + self.errors,
        }


def _execute(stage_name: str, task: Task, cfg_json: dict[str, Any], opts: RunOptions) -> TaskResult:
    """Run one task in whatever process the executor chose. Never raises: failures become results."""
    from prep.config import PrepConfig

    start = time.perf_counter()
    try:
        for out in task.outputs:  # a killed earlier run may have left temp files; this task owns them
            remove_stale_temps(out)
        cfg = PrepConfig.model_validate(cfg_json)
        result = get_stage(stage_name).run_task(task, cfg, opts)
    except PrepError as err:
        result = TaskResult(task.id, "failed", error=err.line())
    except Exception as err:  # a bug or an unexpected library error: the trace only with --debug
        notes = [traceback.format_exc(limit=-6)] if opts.debug else []
        result = TaskResult(task.id, "failed", error=unexpected_line(err), notes=notes)
    result.seconds = time.perf_counter() - start
    return result


class _InlineExecutor:
    """Runs tasks in this process, one after another (workers=1: simplest, debuggable, no pickling)."""

    def submit(self, fn: Callable[..., TaskResult], *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self) -> None:
        pass


def _completed(executor: Any, todo: list[Task], name: str, cfg_json: dict[str, Any],
               opts: RunOptions) -> Iterator[tuple[Task, TaskResult]]:
    """(task, result) as each task finishes, so its marker is written at once and a killed run resumes
    after the last finished task. In-process tasks run one by one here, under the progress bar."""
    if isinstance(executor, _InlineExecutor):
        for t in todo:
            yield t, _execute(name, t, cfg_json, opts)
        return
    futures = {executor.submit(_execute, name, t, cfg_json, opts): t for t in todo}
    for fut in cf.as_completed(futures):
        t = futures[fut]
        try:
            r = fut.result()
        except Exception as err:  # the worker process died (killed, out of memory)
            r = TaskResult(t.id, "failed", error=f"worker process died ({type(err).__name__}: {err}); "
                           "re-run to retry this task")
        yield t, r


RUNNERS = ("local", "ray")


def check_output_folder(folder: Path, stage: str) -> None:
    """Fail once, before any task, when the stage cannot write its output folder (a file is there, a
    parent is a file, no permission, a read-only disk) instead of once per task. Creates the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_name(folder / ".prep-write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        is_file = folder.exists() and not folder.is_dir()
        what = "the output folder is a file" if is_file else \
            f"cannot write the output folder ({err.strerror or type(err).__name__})"
        raise PrepError(what, str(folder),
                        f"set {stage}.output_dir (or dataset_output_root) to a folder you can write"
                        + (", or move the file away" if is_file else ", or fix its permissions")) from None


# How the local pool starts its workers: fresh interpreters, which import prep and the stage anew and
# inherit this process's environment, sys.path and folder as they are now. A forked worker inherits the
# parent's memory without its threads: after torch ran here (OpenMP's thread team, MKL, oneDNN), a forked
# worker's first parallel torch op waited forever for team members that were never copied; a child forked
# after the parent used CUDA cannot use CUDA; Python 3.12 warns on any fork of a multi-threaded process,
# which numpy's OpenBLAS threads make nearly every process. forkserver's server keeps the environment of
# its first start, so os.environ set later (a token, HF_HUB_OFFLINE) would not reach the workers. The
# cost: each worker imports what its tasks need, once per run (measured on 2 cores: +0.5 s for
# reorganize_tar, +6 s for precache_encodings, whose workers import torch and the model libraries).
POOL_START_METHOD = "spawn"


def _number_worker(counter: Any) -> None:
    """Pool initializer: give this worker the next number (0, 1, ...) in POOL_WORKER_ENV, which
    `local_gpu_index` reads to spread the workers over the GPUs."""
    with counter.get_lock():
        os.environ[POOL_WORKER_ENV] = str(counter.value)
        counter.value += 1


def make_executor(opts: RunOptions, n_tasks: int, gpus_per_task: float = 0.0):
    """The executor for `opts.runner`: Ray (asking `gpus_per_task` GPUs a task where the cluster has
    any), the local pool of numbered workers, or this process when one worker or one task."""
    if opts.runner == "ray":
        from prep.runtime.ray_runner import RayExecutor

        return RayExecutor(opts, gpus_per_task)
    if opts.runner != "local":
        raise PrepError(f"unknown runner {opts.runner!r}", "--runner", "use local or ray")
    if opts.workers <= 1 or n_tasks <= 1:
        return _InlineExecutor()
    ctx = mp.get_context(POOL_START_METHOD)
    return cf.ProcessPoolExecutor(max_workers=min(opts.workers, n_tasks), mp_context=ctx,
                                  initializer=_number_worker, initargs=(ctx.Value("i", 0),))


def check_not_importing_main() -> None:
    """Fail before any work when a pool worker, importing the caller's script as every spawned process
    does, reaches a run_stage call the script does not keep under `if __name__ == "__main__":`; the
    worker would otherwise run the script's stages again. The flag is the one multiprocessing's own
    check (`spawn._check_not_importing_main`) reads."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise PrepError("run_stage was called while a worker process imported your script",
                        sys.argv[0] or "the main module",
                        'put the script\'s run_stage calls under `if __name__ == "__main__":` (workers '
                        "start as fresh interpreters that import the main module)")


def run_stage(name: str, cfg: Any, opts: RunOptions, console: Console | None = None) -> StageRun:
    check_not_importing_main()
    console = console or Console(stderr=True)
    if opts.runner not in RUNNERS:
        raise PrepError(f"unknown runner {opts.runner!r}", "--runner", f"use one of: {', '.join(RUNNERS)}")
    stage = get_stage(name)
    start = time.perf_counter()
    tasks: list[Task] = stage.plan(cfg, opts)
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise PrepError(f"stage plan has two tasks named {dup!r}", name, "this is a bug in the stage plan")
    mine = slice_tasks(tasks, opts.task_index, opts.num_tasks)
    if stage.TORCHRUN_RANKS:  # each rank of a torchrun launch takes every WORLD_SIZE-th task of its slice
        mine = slice_tasks(mine, *torchrun_slice())
    run = StageRun(name, len(tasks))
    prepare = getattr(stage, "prepare", None)  # optional costly checks: only with work, or a dry run
    if opts.dry_run:
        if prepare is not None:  # a dry run is how a config is checked: check all of it
            prepare(cfg, opts)
        run.results = [TaskResult(t.id, "planned", data={"payload": t.shown_payload()}) for t in mine]
        return run
    outputs = stage.output_dirs(cfg)
    markers = marker_dir(outputs[0], name)
    # each task's fingerprint, once: it hashes the whole payload (a thousand images' paths), and the
    # marker check, the marker write, the finalize digest and the finalize check all need it
    prints = {t.id: t.fingerprint(name, stage.VERSION) for t in tasks}
    results: dict[str, TaskResult] = {}
    todo: list[Task] = []
    for t in mine:
        prior = None if opts.force else read_valid_marker(markers, t, prints[t.id],
                                                           verify=opts.verify_markers)
        if prior is not None and not prior.transient:  # a task with transient failures is tried again
            results[t.id] = prior
        else:
            todo.append(t)
    if todo and prepare is not None:
        prepare(cfg, opts)
    check_output_folder(outputs[0], name)
    if todo:
        cfg_json = cfg.model_dump(mode="json")
        gpus = getattr(stage, "gpus_per_task", None)
        executor = make_executor(opts, len(todo), gpus(cfg) if gpus is not None else 0.0)
        try:
            total = sum(t.weight for t in todo)
            with task_progress(console, name, total, disable=opts.quiet) as advance:
                for t, r in _completed(executor, todo, name, cfg_json, opts):
                    if r.status != "failed":
                        try:
                            r.outputs = describe_outputs(t.outputs, r.outputs)
                            record_rewrites(r.rewrote, r.outputs)
                            write_marker(markers, t, prints[t.id], r)
                        except OSError as err:
                            r.status, r.error = "failed", f"output missing after the task ran ({err})"
                    results[t.id] = r
                    advance(t.weight)
        finally:
            executor.shutdown()
    run.results = [results[t.id] for t in mine]
    digest = finalize_digest(list(prints.items()),
                             {"config": getattr(cfg, name).model_dump(mode="json"), "strict": opts.strict})
    if run.ok:
        everything: list[TaskResult] = []
        for t in tasks:
            found = results.get(t.id) or read_valid_marker(markers, t, prints[t.id])
            if found is None:
                break
            everything.append(found)
        if len(everything) != len(tasks):
            run.waiting_for_other_slices = True
        elif not todo and finalized_already(markers, digest):
            run.finalized = run.finalize_skipped = True
        else:
            before = folder_listing(outputs)
            try:
                run.finalize_notes = stage.finalize(cfg, everything, opts)
                run.finalized = True
                write_finalized(markers, digest, before, folder_listing(outputs))
            except PrepError as err:
                run.errors.append(err.line())
    if run.ok and not run.waiting_for_other_slices:  # the stage is complete: once, not in every slice
        for folder in outputs:  # temps of killed writers (markers, manifest, ...); live writers' stay
            remove_dead_temps(folder)
    run.seconds = time.perf_counter() - start
    if not run.nothing_to_do:
        write_summary(outputs[0], run, opts)
    return run


SUMMARY_DIR = ".prep/summary"


def summary_path(folder: Path, stage: str, opts: RunOptions) -> Path:
    """Where a run's summary is kept: `<first output folder>/.prep/summary/<stage>.json` (one per slice
    under Slurm arrays), read by `prep report` for stage timings and throughput."""
    part = f".slice-{opts.task_index}-of-{opts.num_tasks}" if opts.num_tasks is not None else ""
    return folder / SUMMARY_DIR / f"{stage}{part}.json"


def write_summary(folder: Path, run: StageRun, opts: RunOptions) -> None:
    doc = {**run.to_json(), "workers": opts.workers, "runner": opts.runner,
           "task_seconds": round(sum(r.seconds for r in run.results if r.status == "done"), 3)}
    path = summary_path(folder, run.stage, opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1))
