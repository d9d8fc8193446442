"""`TrainingPipelineOrchestrator`: run a pipeline's steps, checkpoint, resume on the exact next batch.

Per step: build the step's loader (prep.loaders: O(1) exact resume) and call `set_epoch` every epoch;
freeze / unfreeze modules; build `torch.optim` optimizers over the named modules' trainable parameters
and schedulers (`auto` = the step's length in optimizer steps); wrap trained modules in DDP under
torchrun; train with the step's trainers; keep moving averages of every metric; validate on its
cadence (or after every train chunk); check the transition rule on its cadence; checkpoint; write the
trainers' sample pictures (every `sample_every` and at the end); at the end free the step's optimizers
and record why the step ended.

A trainer is any object with `train_step(batch, ctx) -> dict[str, float | Tensor]` and optionally
`val_step(batch, ctx)`, `metrics`, `state_dict()` / `load_state_dict()`, `sample(ctx)`. It calls
`ctx.backward(loss)`; optimizers step on their own at accumulation boundaries unless the trainer steps
them itself with `ctx.optimizer_step(name)` (a GAN's two optimizers, say).

Exactness: a checkpoint holds every state that decides the next batch (modules, optimizers,
schedulers, scaler, EMA, trainers, RNGs of every rank, loader cursors, metric windows, patience
counters, counters), taken after a whole batch; a resumed run continues with the batch that would have
come next, bitwise, on CPU. Iterating the loader never moves torch's global RNG (the orchestrator
restores it around the loader's start), so the trainer's random stream is the same with or without
a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from prep.errors import PrepError, labelled_line
from prep.loaders.base import stream_key
from prep.loaders.chunked import limit_to_batches
from prep.pipeline import checkpoint as ckpt
from prep.pipeline.checks import AUTO_KWARGS, optimizer_class, scheduler_class
from prep.pipeline.config import PipelineConfig, StepConfig
from prep.pipeline.data import build_loader, resolve_batch_sizes
from prep.pipeline.distributed import Dist, average, barrier, broadcast, gather, init, leave, wrap
from prep.pipeline.durations import Duration
from prep.pipeline.fingerprint import changes, step_doc
from prep.pipeline.plan import (
    batch_samples,
    checkpoint_warning,
    counted_in_epochs,
    require_batches,
    step_chunks,
    step_length,
    train_batches_per_epoch,
)
from prep.pipeline.transitions import Metrics, Transition


# ------------------------------------------------------------------------------------------ state
@dataclass
class RunState:
    """Where the run is: JSON in every checkpoint."""

    step_index: int = 0
    step_epoch: int = 0
    batch_in_epoch: int = 0
    step_batches: int = 0
    step_samples: int = 0
    global_batches: int = 0
    optimizer_steps: int = 0
    samples_seen: int = 0
    step_seconds: float = 0.0
    val_epoch: int = 0
    completed: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepContext:
    """What a trainer sees. `modules` are DDP-wrapped where a step trains them under torchrun (call
    them, not the raw ones, for gradients to be averaged, or `forward_with` for methods other than
    forward); `raw_modules` are the modules themselves."""

    step: StepConfig
    index: int
    modules: dict[str, torch.nn.Module]
    raw_modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    device: torch.device
    rank: int
    world_size: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    scaler: Any = None
    boundary: bool = True  # this batch ends an accumulation window: optimizers step after it
    where: str = ""  # the step in the config (file:line), for errors
    _stepped: set[str] = field(default_factory=set)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the step's `precision` (a no-op for fp32)."""
        if self.step.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.step.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss / grad_accumulation`, through the fp16 grad scaler when there is one."""
        if not loss.requires_grad:  # torch would say "element 0 of tensors does not require grad"
            raise PrepError(
                f"step {self.step.name!r}: the loss needs no gradient: the step trains "
                f"{', '.join(self.step.trained_modules) or 'no module'} and every other module is frozen",
                self.where or f"steps.{self.index}",
                "give the step an optimizer for each module its trainers train (or list it in unfreeze)",
            )
        if self.step.grad_accumulation > 1:
            loss = loss / self.step.grad_accumulation
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def forward_with(self, name: str, fn: Any, *args: Any) -> Any:
        """`fn(module, *args)` run as module `name`'s forward, through its DDP wrapper when it has one.

        DDP averages the gradients of what goes through its forward only: a module trained through
        other methods (a VAE's `encode` and `decode`) and called directly would train on each rank
        alone, and the ranks' weights would drift apart without an error. `fn` may call the module
        itself (a text encoder's own forward): the stand-in is gone before `fn` runs."""
        wrapped = self.modules[name]
        if not isinstance(wrapped, DistributedDataParallel):
            return fn(wrapped, *args)
        module = wrapped.module
        had = module.__dict__.get("forward")

        def restore() -> None:
            if had is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = had

        def stand_in(*a: Any) -> Any:
            restore()
            return fn(module, *a)

        module.forward = stand_in  # an instance attribute shadows the class's forward
        try:
            return wrapped(*args)
        finally:
            restore()

    def optimizer_step(self, name: str) -> bool:
        """Step optimizer `name` (unscale, clip, step, zero grads, its scheduler) if this batch ends an
        accumulation window; returns whether it stepped."""
        if not self.boundary or name in self._stepped:
            return False
        opt = self.optimizers[name]
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.step.grad_clip_norm is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.step.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(opt)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.schedulers.get(name)
        if sched is not None and not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step()
        self._stepped.add(name)
        return True


@dataclass
class StepSummary:
    index: int
    name: str
    batches: int
    samples: int
    epochs: float
    seconds: float
    reason: str
    metrics: dict[str, float]
    val_metrics: dict[str, float]


# ------------------------------------------------------------------------------------------ helpers
def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch moved to `device` (loaders give CPU tensors: nothing to do on CPU; lists of
    keys, captions or bytes are left as they are)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    nested = torch.Tensor | dict | list | tuple
    if isinstance(batch, list | tuple) and any(isinstance(v, nested) for v in batch):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        if "__key__" in batch:
            return len(batch["__key__"])
        for v in batch.values():
            if hasattr(v, "__len__"):
                return len(v)
    return len(batch) if hasattr(batch, "__len__") else 1


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        for k, v in metrics.items()
    }


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *[float(x) for x in np_state[2:]],
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device's) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _new_rank_seed(seed: int | None, saved: list[dict[str, Any]], rank: int, position: int) -> int:
    """The seed of a rank that a checkpoint has no RNG state for (resumed on more ranks than saved it):
    a hash of (the pipeline's seed, rank, global batch), so the rank's draws are the same in every such
    resume and differ from every other rank's. Without `defaults.seed`, rank 0's saved torch state
    stands in for it (still a function of the checkpoint alone)."""
    if seed is None:
        state = saved[0]["torch"].numpy().tobytes()
        seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little")
    return stream_key(seed, "pipeline", "rank rng", rank, position)


def _every(d: Duration | None, global_batch: int) -> tuple[str, int] | None:
    """A cadence as ('ep', k) or ('ba', k); samples become whole batches."""
    if d is None:
        return None
    if d.unit == "sp":
        return ("ba", max(1, -(-d.value // global_batch)))
    return (d.unit, d.value)


# ---------------------------------------------------------------------------------------- orchestrator
class TrainingPipelineOrchestrator:
    """Run `config`'s steps over `modules` with `trainers`, checkpointing into `checkpoint_dir`.

    `resume`: 'auto' (the newest checkpoint in checkpoint_dir, if any), 'never', or a checkpoint path;
    checkpoint_dir may not hold checkpoints past the one the run starts from (another run's).
    `allow_config_change`: resume even if the current or a finished step's fingerprint changed.
    `args`: the caller's fallback batch_size / workers (see `prep.pipeline.resolve`).
    """

    def __init__(
        self,
        config: PipelineConfig,
        modules: Mapping[str, torch.nn.Module],
        trainers: Mapping[str, Any],
        checkpoint_dir: str | Path,
        *,
        args: Mapping[str, int | None] | None = None,
        device: str | torch.device | None = None,
        resume: str | Path = "auto",
        allow_config_change: bool = False,
        keep_last: int = 3,
        progress: bool = True,
        console: Any = None,
    ) -> None:
        self.cfg = config
        self.modules = dict(modules)
        self.trainers = dict(trainers)
        self.dir = Path(checkpoint_dir)
        self.args = dict(args or {})
        self.device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.keep_last = keep_last
        self.progress = progress
        self.console = console
        self._check_declarations()
        self.dist: Dist = Dist(0, 1)
        self.state = RunState()
        self.summaries: list[StepSummary] = []
        self.warnings: list[str] = []  # what the run warned about (rank 0 prints them too)
        self.ema: dict[str, Any] = {}
        self._carry: dict[str, dict[str, Any]] = {}
        self._resumed_from: Path | None = None  # the checkpoint this run resumed from
        self._requires_grad = {
            name: {n: p.requires_grad for n, p in m.named_parameters()} for name, m in self.modules.items()
        }

    # ------------------------------------------------------------------------------- set-up
    def _check_declarations(self) -> None:
        """The config's module/trainer checks against what the caller really passed (a trainer's
        metrics are checked when every trainer declares `metrics`)."""
        from prep.errors import PrepErrorGroup
        from prep.pipeline.checks import check_config

        cfg = self.cfg
        declared = {n: list(getattr(t, "metrics", None) or []) for n, t in self.trainers.items()}
        problems = check_config(cfg, cfg.datasets, cfg.steps, list(self.modules), declared)
        if not all(getattr(t, "metrics", None) for t in self.trainers.values()):
            problems = [p for p in problems if " reports " not in p[1]]
        if problems:
            raise PrepErrorGroup(
                [PrepError(f"{cfg.dotted(p)}: {w}", cfg.place(p), f) for p, w, f in problems]
            )

    def _frozen_at(self, index: int) -> set[str]:
        """Modules frozen during step `index`: every module the step does not train
        (`StepConfig.trained_modules`: its optimizers' modules and its `unfreeze`). A function of the
        step's config alone, so a resume gets it directly."""
        return set(self.modules) - set(self.cfg.steps[index].trained_modules)

    def _configure_modules(self, step: StepConfig, frozen: set[str]) -> None:
        for name, module in self.modules.items():
            if name not in frozen:
                flags = self._requires_grad[name]
                for n, p in module.named_parameters():
                    p.requires_grad_(flags[n])
                module.train()
        for name in frozen:
            module = self.modules[name]
            module.requires_grad_(False)
            module.train(not step.frozen_eval)

    def _optimizers(self, step: StepConfig) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {}
        for name, o in step.optimization.optimizers.items():
            seen: set[int] = set()
            params = []
            for m in o.params or [name]:
                for p in self.modules[m].parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            if not params:
                path = ("steps", str(self.state.step_index), "optimization", "optimizers", name)
                raise PrepError(
                    f"{self.cfg.dotted(path)}: optimizer {name!r} has no trainable parameters",
                    self.cfg.place(path),
                    "check params and freeze for this step (and requires_grad of the modules you built)",
                )
            out[name] = optimizer_class(o.type)(params, **o.kwargs)  # type: ignore[misc]
        return out

    def _param_names(self) -> dict[int, str]:
        return {id(p): f"{m}.{n}" for m, mod in self.modules.items() for n, p in mod.named_parameters()}

    def _apply_carry(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Give each parameter the state the previous step's optimizer left it, when the new optimizer
        is of the same class (AdamW moments into AdamW; SGD momentum would not fit AdamW)."""
        names = self._param_names()
        for opt in optimizers.values():
            for g in opt.param_groups:
                for p in g["params"]:
                    saved = self._carry.get(names[id(p)])
                    if saved is not None and saved["optimizer"] == type(opt).__name__:
                        opt.state[p] = {
                            k: v.clone() if isinstance(v, torch.Tensor) else v
                            for k, v in saved["state"].items()
                        }
        self._carry = {}

    def _optimizer_params(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[list[str]]]:
        """Each optimizer's parameters by module.parameter name, per group, in its order."""
        names = self._param_names()
        return {
            n: [[names[id(p)] for p in g["params"]] for g in o.param_groups] for n, o in optimizers.items()
        }

    def _load_optimizers(self, optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                         payload: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore the optimizers and schedulers a mid-step checkpoint saved, parameter by parameter
        name. Where an optimizer now trains other parameters than it saved (modules built otherwise, a
        parameter frozen or unfrozen), the resume is refused, naming them; with
        `allow_config_change` the parameters both have keep their state, the others start fresh."""
        where = str(self._resumed_from)
        saved_names = meta.get("optimizer_params")  # not in checkpoints written before it was recorded
        params = self._optimizer_params(optimizers)
        for name, opt in optimizers.items():
            now = params[name]
            state = payload["optimizers"].get(name)
            if state is None:
                self._warn(f"optimizer {name!r} is not in checkpoint {Path(where).name}: it starts fresh")
                continue
            saved = saved_names.get(name) if saved_names is not None else None
            if saved is None:  # no names: the counts must agree for torch's positional match
                counts = [len(g["params"]) for g in state["param_groups"]]
                if counts != [len(g) for g in now]:
                    raise PrepError(
                        f"optimizer {name!r} saved {sum(counts)} parameters in {len(counts)} group(s), "
                        f"this run gives it {sum(map(len, now))} in {len(now)}; the checkpoint records "
                        "no parameter names to match them by",
                        where,
                        "resume with the modules and freeze settings the checkpoint was written with, "
                        "or start the step again from its last step-end checkpoint",
                    )
            elif saved != now:
                was, has = {n for g in saved for n in g}, {n for g in now for n in g}
                diff = "; ".join(part for part in (
                    "no longer trains " + ", ".join(sorted(was - has)) if was - has else "",
                    "now also trains " + ", ".join(sorted(has - was)) if has - was else "",
                    "same parameters in another order or grouping" if was == has else "",
                ) if part)
                if not self.allow_config_change or len(saved) != len(now):
                    fix = "resume with the modules and freeze settings the checkpoint was written with"
                    raise PrepError(
                        f"optimizer {name!r} trains other parameters than this checkpoint saved: {diff}"
                        + (f" ({len(saved)} parameter groups saved, {len(now)} now)" if len(saved) != len(now)
                           else ""),
                        where,
                        fix + (", or pass --allow-config-change (parameters both have keep their state)"
                               if len(saved) == len(now) else ""),
                    )
                self._warn(f"optimizer {name!r}: {diff}; the parameters both runs train keep their "
                           "saved state, the others start fresh")
                state = ckpt.optimizer_state_by_name(state, saved, now)
            opt.load_state_dict(state)
        for name, sched in schedulers.items():
            if name in payload["schedulers"]:
                sched.load_state_dict(payload["schedulers"][name])
            else:
                self._warn(f"scheduler {name!r} is not in checkpoint {Path(where).name}: it starts fresh")

    def _collect_carry(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, dict[str, Any]]:
        """Per parameter (by module.parameter name): its optimizer's class and state."""
        names = self._param_names()
        return {
            names[id(p)]: {"optimizer": type(opt).__name__, "state": dict(st)}
            for opt in optimizers.values()
            for p, st in opt.state.items()
        }

    def _schedulers(
        self, step: StepConfig, optimizers: dict[str, torch.optim.Optimizer], optimizer_steps: int | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, s in step.optimization.schedulers.items():
            kwargs = dict(s.kwargs)
            for k in AUTO_KWARGS & {k for k, v in kwargs.items() if v == "auto"}:
                if optimizer_steps is None:
                    raise PrepError(
                        f"{k}: auto needs the step's length, which is unknown (an endless "
                        "dataset counted in epochs)",
                        self.cfg.place(
                            ("steps", str(self.state.step_index), "optimization", "schedulers", name)
                        ),
                        f"write {k} as a number",
                    )
                kwargs[k] = optimizer_steps
            out[name] = scheduler_class(s.type)(optimizers[name], **kwargs)  # type: ignore[misc]
        return out

    # ------------------------------------------------------------------------------- resume
    def _docs(self, index: int, loader_fp: dict[str, Any] | None) -> dict[str, Any]:
        name = self.cfg.step_dataset(index)
        sizes = (
            resolve_batch_sizes(self.cfg, name, step=self.cfg.steps[index], args=self.args) if name else []
        )
        return step_doc(
            self.cfg, index, batch_sizes={n: r.value * self.dist.world for n, r in sizes}, loader=loader_fp
        )

    def _find_checkpoint(self) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            path = ckpt.newest(self.dir) if self.dist.main else None
            return broadcast(path, self.dist)
        return Path(self.resume)

    def _check_folder(self, start: int) -> None:
        """Refuse checkpoints in the folder past the batch this run starts from (a fresh run, or one
        resumed from an older checkpoint): they are another run's, and would outrank this run's in
        pruning (its new checkpoints deleted as the oldest) and in the next `--resume auto`."""
        later = broadcast(ckpt.past(self.dir, start) if self.dist.main else None, self.dist)
        if later:
            shown = ", ".join(later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
            raise PrepError(
                f"the checkpoint folder holds {len(later)} checkpoint(s) past batch {start}, where this "
                f"run starts: {shown}",
                str(self.dir),
                "move or delete them (they would outrank this run's checkpoints when pruning and "
                "resuming), or pass another --checkpoint-dir",
            )

    def _check_fingerprints(self, meta: dict[str, Any], upto: int, current: dict[str, Any] | None) -> None:
        """Refuse a resume when a step this checkpoint ran differs from the config: steps before `upto`
        by their config, step `upto` (when `current` is given: the step it stopped inside) with its
        loader too. Steps not yet started may change freely."""
        saved: list[dict[str, Any]] = meta["fingerprints"]
        problems: list[str] = []
        last = upto if current is not None else upto - 1
        for i in range(min(last + 1, len(saved))):
            if i >= len(self.cfg.steps):
                problems.append(f"step {i} ({saved[i]['name']}) was removed")
                continue
            doc = current if i == upto and current is not None else self._docs(i, None)
            diff = changes(saved[i], doc, loader=doc is current and "loader" in saved[i])
            if diff:
                what = "current" if doc is current else "finished"
                problems.append(f"{what} step {i} ({self.cfg.steps[i].name}): " + "; ".join(diff[:6]))
        if problems and not self.allow_config_change:
            raise PrepError(
                "the config changed for steps this checkpoint already ran: " + " | ".join(problems),
                self.cfg.source,
                "undo the change, or pass --allow-config-change (later, "
                "not yet started steps may change freely)",
            )

    # ---------------------------------------------------------------------------------- run
    def run(self, *, max_batches: int | None = None) -> list[StepSummary]:
        """Run (or resume) the pipeline. `max_batches`: stop after training this many batches in this
        call, with a checkpoint (a job with a time limit resumes from it)."""
        self.dist = init(self.device)
        lock, holder = ckpt.hold(self.dir) if self.dist.main else (None, None)
        try:
            holder = broadcast(holder, self.dist)
            if holder is not None:
                raise PrepError(
                    f"another run is using the checkpoint folder ({holder})",
                    str(self.dir),
                    "wait for it to end or end it (torchrun killed with SIGKILL leaves its workers "
                    "running: find them with ps), or pass another --checkpoint-dir",
                )
            return self._run(max_batches)
        finally:
            ckpt.release(lock)

    def _run(self, max_batches: int | None) -> list[StepSummary]:
        for m in self.modules.values():
            m.to(self.device)
        if self.dist.main:
            ckpt.remove_temps(self.dir)
        path = self._resumed_from = self._find_checkpoint()
        payload = ckpt.load(path) if path is not None else None
        meta = json.loads(payload["meta"]) if payload is not None else None
        self._check_folder(meta["state"]["global_batches"] if meta is not None else 0)
        if meta is not None:
            self.state = RunState(**meta["state"])
            index = self.state.step_index
            self._check_fingerprints(meta, index, None)  # the finished steps; the current one once built
            for name, sd in payload["modules"].items():  # type: ignore[index]
                if name in self.modules:
                    self.modules[name].load_state_dict(sd)
            self._carry = payload.get("carry") or {}  # type: ignore[union-attr]
        elif self.cfg.defaults.seed is not None:  # a fresh run: every RNG from the pipeline's seed
            _seed_all(self.cfg.defaults.seed + self.dist.rank)
        trained_here = 0
        n = len(self.cfg.steps)
        finished_in = path.name if path is not None and self.state.step_index >= n else None
        while self.state.step_index < n:
            if max_batches is not None and trained_here >= max_batches:  # on a step end: its checkpoint
                leave(self.dist)
                return self.summaries
            done, trained = self._run_step(self.state.step_index, payload, meta, max_batches, trained_here)
            trained_here += trained
            payload = meta = None
            if not done:  # stopped after max_batches, with a checkpoint
                leave(self.dist)
                return self.summaries
        if self.dist.main and self.progress:
            if finished_in is not None:  # a re-run of a finished run: say so, as the stages do
                self._console().print(
                    f"prep pipeline run: nothing to train — all {n} step(s) were done already "
                    f"(checkpoint {finished_in}); the run's summary:")
            self.print_summary()
        barrier(self.dist)
        leave(self.dist)
        return self.summaries

    def _run_step(
        self,
        index: int,
        payload: dict[str, Any] | None,
        meta: dict[str, Any] | None,
        max_batches: int | None,
        trained_before: int,
    ) -> tuple[bool, int]:
        step = self.cfg.steps[index]
        st = self.state
        frozen = self._frozen_at(index)
        self._configure_modules(step, frozen)
        loader, built, _ = build_loader(self.cfg, self.cfg.step_dataset(index), step=step, args=self.args)  # type: ignore[arg-type]
        val_loader = val_initial = None
        if step.validation is not None:
            val_loader, val_built, _ = build_loader(
                self.cfg, step.validation.dataset, args=self.args, batch_size=step.validation.batch_size
            )
            val_initial = val_loader.state_dict()
            vb, val_name = val_built, step.validation.dataset
            require_batches(self.cfg, index, val_name, vb.batches_per_epoch, vb.samples_per_epoch)
        doc = self._docs(index, built.node.fingerprint())
        if meta is not None and meta["in_step"]:
            self._check_fingerprints(meta, index, doc)
        bpe = built.batches_per_epoch
        require_batches(self.cfg, index, str(self.cfg.step_dataset(index)), bpe, built.samples_per_epoch)
        sizes = resolve_batch_sizes(self.cfg, self.cfg.step_dataset(index), step=step, args=self.args)  # type: ignore[arg-type]
        batch = batch_samples(sizes, self.dist.world, bpe, built.samples_per_epoch) or 1
        length = step_length(step, bpe, built.samples_per_epoch, batch)
        by_epochs = counted_in_epochs(length)
        epochs_target = int(length.epochs) if by_epochs and length.epochs is not None else None
        if by_epochs and bpe is None:
            raise PrepError(
                f"step {step.name!r} counts epochs of a dataset that has none (it repeats)",
                self.cfg.place(("steps", str(index))),
                "give the dataset epoch_length, or the step max_steps / a duration in ba or sp",
            )
        chunk = self._chunking(step, bpe, val_loader)
        epoch_batches = train_batches_per_epoch(self.cfg, index, bpe, chunk is not None)
        warning = checkpoint_warning(self.cfg, index, length, epoch_batches, batch, sized=True)
        if warning is not None:  # at every start of the step: a resumed run is as exposed
            self._warn(warning.line())
        batches_target = None if by_epochs else length.batches
        total_batches = (
            epochs_target * epoch_batches if epochs_target is not None and epoch_batches else batches_target
        )
        opt_steps = -(-total_batches // step.grad_accumulation) if total_batches else None
        optimizers = self._optimizers(step)
        schedulers = self._schedulers(step, optimizers, opt_steps)
        scaler = torch.amp.GradScaler(self.device.type) if step.precision == "fp16" else None
        self._setup_ema(step)
        transition = Transition(step.transition_on)
        metrics = Metrics(step.metrics_window)
        if payload is not None and meta is not None and meta["in_step"]:
            self._load_optimizers(optimizers, schedulers, payload, meta)
            if scaler is not None and payload.get("scaler"):
                scaler.load_state_dict(payload["scaler"])
            transition.load_state_dict(meta["transition"])
            metrics = Metrics.from_state(meta["metrics"])
            loader.load_state_dict(json.loads(payload["loader"]))
            if val_loader is not None and payload.get("val_loader"):
                val_loader.load_state_dict(json.loads(payload["val_loader"]))
        else:
            if step.carry_optimizer:
                self._apply_carry(optimizers)
            self._carry = {}
            st.step_epoch = st.batch_in_epoch = st.step_batches = st.step_samples = st.val_epoch = 0
            st.step_seconds = 0.0
        if payload is not None:
            for name, sd in (payload.get("trainers") or {}).items():
                if name in self.trainers and hasattr(self.trainers[name], "load_state_dict"):
                    self.trainers[name].load_state_dict(sd)
            keep = meta is not None and (
                meta["in_step"] or (step.ema is not None and step.ema.policy == "keep")
            )
            for name, sd in (payload.get("ema") or {}).items() if keep else ():
                if name in self.ema:
                    self.ema[name].load_state_dict(sd)
            rngs, rank = payload["rng"], self.dist.rank
            if rank < len(rngs):  # the state this rank saved: the same numbers as without the stop
                _set_rng_state(rngs[rank])
            else:  # a rank the saving run did not have: its own stream (not rank 0's copy)
                _seed_all(_new_rank_seed(self.cfg.defaults.seed, rngs, rank, st.global_batches))
        wrapped = {
            n: wrap(m, self.dist, self.device) if n not in frozen else m for n, m in self.modules.items()
        }
        ctx = StepContext(
            step,
            index,
            wrapped,
            self.modules,
            optimizers,
            schedulers,
            self.device,
            self.dist.rank,
            self.dist.world,
            scaler=scaler,
            where=self.cfg.place(("steps", str(index))),
        )
        run = _StepRun(
            self,
            index,
            step,
            loader,
            val_loader,
            val_initial,
            ctx,
            metrics,
            transition,
            doc,
            epochs_target,
            batches_target,
            epoch_batches,
            chunk,
            batch,
        )
        finished, trained, reason = run.loop(None if max_batches is None else max_batches - trained_before)
        if not finished:
            return False, trained
        summary = StepSummary(
            index,
            step.name,
            st.step_batches,
            st.step_samples,
            st.step_epoch + (st.batch_in_epoch / epoch_batches if epoch_batches else 0.0),
            st.step_seconds,
            reason,
            metrics.averages(),
            dict(metrics.val),
        )
        run.sample()
        self.summaries.append(summary)
        st.completed.append({**asdict(summary), "history": metrics.history})  # kept for the whole run
        nxt = self.cfg.steps[index + 1] if index + 1 < len(self.cfg.steps) else None
        self._carry = self._collect_carry(optimizers) if nxt is not None and nxt.carry_optimizer else {}
        st.step_index += 1
        st.step_epoch = st.batch_in_epoch = st.step_batches = st.step_samples = st.val_epoch = 0
        st.step_seconds = 0.0
        run.save(step_end=True)
        # every module's: a trainable module no optimizer stepped gathered gradients all step, which
        # would join its first update in a later step (and a resume, which saves no gradients, not)
        for m in self.modules.values():
            m.zero_grad(set_to_none=True)
        del optimizers, schedulers, ctx, run
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True, trained

    def _console(self) -> Any:
        """Where the run's messages go: the console it was given, else stderr."""
        if self.console is not None:
            return self.console
        from rich.console import Console

        return Console(stderr=True)

    def _warn(self, line: str) -> None:
        """Keep a warning in `warnings`; rank 0 prints it, progress bar or not."""
        self.warnings.append(line)
        if self.dist.main:
            self._console().print(labelled_line("warning", line), highlight=False, soft_wrap=True)

    def _chunking(self, step: StepConfig, bpe: int | None, val_loader: Any) -> tuple[int, int] | None:
        val_bpe = val_loader.dataset.batches_per_epoch() if val_loader is not None else None
        plan = step_chunks(step, bpe, val_bpe)
        if not plan.chunked or plan.train_chunk_size is None or plan.val_chunk_size is None:
            return None
        return plan.train_chunk_size, plan.val_chunk_size

    def _setup_ema(self, step: StepConfig) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        if step.ema is None:
            self.ema = {}
            return
        names = step.ema.modules or sorted(step.trained_modules)  # by default, what the step trains
        keep = step.ema.policy == "keep"
        avg = get_ema_multi_avg_fn(step.ema.decay)
        self.ema = {
            n: self.ema[n] if keep and n in self.ema else AveragedModel(self.modules[n], multi_avg_fn=avg)
            for n in names
        }
        for e in self.ema.values():  # a kept average goes on with this step's decay
            e.multi_avg_fn = avg

    def print_summary(self) -> None:
        """A table of the steps, then one of their final metrics, a row per metric: in one column
        beside the steps, a step's several metrics would wrap a few characters a line at 80 columns."""
        from rich.table import Column, Table

        steps = Table(title="pipeline summary", header_style="bold")
        for col in ("#", "step", "batches", "samples", "epochs", "time"):
            steps.add_column(col, no_wrap=True)
        steps.add_column("ended because", ratio=1)
        metrics = Table(
            *(Column(c, no_wrap=True) for c in ("#", "step", "metric")),
            Column("final value", justify="right", no_wrap=True),
            title="final metrics",
            caption="train: moving average; val/: the last validation",
            header_style="bold",
        )
        for s in self.state.completed:
            n = str(s["index"] + 1)
            steps.add_row(n, s["name"], f"{s['batches']:,}", f"{s['samples']:,}", f"{s['epochs']:.2f}",
                          f"{s['seconds']:.1f}s", s["reason"])
            shown = {**s["metrics"], **{f"val/{k}": v for k, v in s["val_metrics"].items()}}
            for i, (k, v) in enumerate(shown.items()):
                metrics.add_row(n if i == 0 else "", s["name"] if i == 0 else "", k, f"{v:.4g}",
                                end_section=i == len(shown) - 1)
        console = self._console()
        console.print(steps)
        if metrics.row_count:
            console.print(metrics)


class _StepRun:
    """One step's training loop and its checkpoints."""

    def __init__(
        self,
        orch: TrainingPipelineOrchestrator,
        index: int,
        step: StepConfig,
        loader: Any,
        val_loader: Any,
        val_initial: Any,
        ctx: StepContext,
        metrics: Metrics,
        transition: Transition,
        doc: dict[str, Any],
        epochs_target: int | None,
        batches_target: int | None,
        epoch_batches: int | None,
        chunk: tuple[int, int] | None,
        global_batch: int,
    ) -> None:
        self.o, self.index, self.step = orch, index, step
        self.loader, self.val_loader, self.val_initial = loader, val_loader, val_initial
        self.ctx, self.metrics, self.transition, self.doc = ctx, metrics, transition, doc
        self.epochs_target, self.batches_target, self.epoch_batches = (
            epochs_target,
            batches_target,
            epoch_batches,
        )
        self.chunk = chunk
        v = step.validation
        self.val_every = ("ba", chunk[0]) if chunk else _every(v.every if v else None, global_batch)
        self.check_every = _every(step.transition_on.check_every, global_batch)
        self.ckpt_every = _every(step.checkpoint_every, global_batch)
        self.sample_every = _every(step.sample_every, global_batch)
        self.trainers = [orch.trainers[t] for t in step.trainers]

    # ---------------------------------------------------------------------------- cadences
    def _due_batch(self, every: tuple[str, int] | None) -> bool:
        return every is not None and every[0] == "ba" and self.o.state.step_batches % every[1] == 0

    def _due_epoch(self, every: tuple[str, int] | None, default: bool) -> bool:
        if every is None:
            return default
        return every[0] == "ep" and self.o.state.step_epoch % every[1] == 0

    # -------------------------------------------------------------------------------- loop
    def loop(self, budget: int | None) -> tuple[bool, int, str]:
        st = self.o.state
        trained = 0
        started = time.perf_counter() - st.step_seconds
        done_epochs = f"epoch: {step_length(self.step, None, None).rule} done"  # the key that set it
        progress = _Progress(
            self.o, self.index, self.step, self.epochs_target, self.batches_target, self.epoch_batches
        )
        want_save = False
        with progress:
            while True:
                if self.epochs_target is not None and st.step_epoch >= self.epochs_target:
                    return True, trained, done_epochs
                if self.epoch_batches is None or st.batch_in_epoch < self.epoch_batches:
                    self.loader.set_epoch(st.step_epoch)
                    for batch in self.loader:
                        self._train(batch)
                        trained += 1
                        st.step_seconds = time.perf_counter() - started
                        progress.update(self.metrics)
                        reason = self._after_batch()
                        if reason is not None:
                            return True, trained, reason
                        # checkpoints wait for the end of an accumulation window: gradients half
                        # accumulated (and, under DDP, not yet averaged) are never saved
                        want_save = want_save or self._due_batch(self.ckpt_every)
                        if budget is not None and trained >= budget and self.ctx.boundary:
                            self.save()
                            return False, trained, "stopped: max_batches"
                        if want_save and self.ctx.boundary:
                            self.save()
                            want_save = False
                        if self.epoch_batches is not None and st.batch_in_epoch >= self.epoch_batches:
                            break
                if st.batch_in_epoch == 0:
                    raise PrepError(
                        f"step {self.step.name!r}: epoch {st.step_epoch} of its dataset has no batches",
                        self.o.cfg.place(("steps", str(self.index))),
                        "check the dataset",
                    )
                st.step_epoch += 1
                st.batch_in_epoch = 0
                reason = self._after_epoch()
                if reason is not None:
                    return True, trained, reason
                if self.epochs_target is not None and st.step_epoch >= self.epochs_target:
                    return True, trained, done_epochs
                if self._due_epoch(self.ckpt_every, default=True) or want_save:
                    want_save = not self.ctx.boundary
                    if not want_save:
                        self.save()

    def _train(self, batch: Any) -> None:
        st, ctx, step = self.o.state, self.ctx, self.step
        n = _batch_len(batch) * self.o.dist.world
        k = step.grad_accumulation
        last = self.batches_target is not None and st.step_batches + 1 >= self.batches_target
        ctx.boundary = (
            (st.step_batches + 1) % k == 0
            or last
            or (
                self.epochs_target is not None
                and self.epoch_batches is not None
                and st.step_epoch + 1 >= self.epochs_target
                and st.batch_in_epoch + 1 >= self.epoch_batches
            )
        )
        ctx.global_step, ctx.epoch, ctx.batch_in_epoch = st.global_batches, st.step_epoch, st.batch_in_epoch
        ctx._stepped = set()
        batch = _to_device(batch, self.o.device)
        values: dict[str, float] = {}
        with contextlib.ExitStack() as stack:
            if not ctx.boundary:
                for m in ctx.modules.values():
                    if isinstance(m, DistributedDataParallel):
                        stack.enter_context(m.no_sync())
            for trainer in self.trainers:
                values.update(_floats(trainer.train_step(batch, ctx) or {}))
        if ctx.boundary:
            for name in ctx.optimizers:
                ctx.optimizer_step(name)
            if ctx.scaler is not None:
                ctx.scaler.update()
            for name, ema in self.o.ema.items():
                ema.update_parameters(self.o.modules[name])
            st.optimizer_steps += 1
        self.metrics.add(average(values, self.o.dist))
        st.batch_in_epoch += 1
        st.step_batches += 1
        st.global_batches += 1
        st.step_samples += n
        st.samples_seen += n

    def _after_batch(self) -> str | None:
        st = self.o.state
        if self._due_batch(self.sample_every):
            self.sample()
        if self._due_batch(self.val_every):
            self.validate()
        reason = self.transition.check(self.metrics) if self._due_batch(self.check_every) else None
        if reason is None and self.batches_target is not None and st.step_batches >= self.batches_target:
            reason = (
                f"{'max_steps' if self.step.transition_on.mode == 'max_steps' else 'length'}: "
                f"{self.batches_target} batches done"
            )
        if reason is not None or self._due_batch(self.check_every):
            self._plateau_schedulers()
        return reason

    def _after_epoch(self) -> str | None:
        if self.val_loader is not None and (self.val_every is None or self._due_epoch(self.val_every, False)):
            self.validate()
        self.metrics.record("epoch", self.o.state.step_batches, self.metrics.averages())
        if self.check_every is None or self._due_epoch(self.check_every, default=False):
            self._plateau_schedulers()
            return self.transition.check(self.metrics)
        return None

    def _plateau_schedulers(self, validated: bool = False) -> None:
        """Step each ReduceLROnPlateau on its monitor: a validation metric right after each validation
        (once per value), else the training moving average at each check."""
        for name, sched in self.ctx.schedulers.items():
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = self.step.optimization.schedulers[name].monitor
                if monitor in self.metrics.val:
                    if validated:
                        sched.step(self.metrics.val[monitor])
                elif not validated and (value := self.metrics.averages().get(monitor)) is not None:  # type: ignore[arg-type]
                    sched.step(value)

    # -------------------------------------------------------------------------- validation
    def validate(self) -> None:
        trainers = [t for t in self.trainers if hasattr(t, "val_step")]
        if self.val_loader is None or not trainers:
            return
        limit = self.chunk[1] if self.chunk else None
        if not self.chunk:  # the whole validation set (or its limit), from its start, every time
            self.val_loader.load_state_dict(self.val_initial)
            lim = self.step.validation.limit_val_batches if self.step.validation else None
            if lim is not None:
                bpe = self.val_loader.dataset.batches_per_epoch()
                # a count above the set is the set (not read twice); of an endless set, a fraction is none
                endless = lim if isinstance(lim, int) else 0
                limit = limit_to_batches(lim, bpe) if bpe is not None else endless
        modes = {n: m.training for n, m in self.o.modules.items()}
        for m in self.o.modules.values():
            m.eval()
        ema = self.step.ema
        averaged = self._ema_weights(ema is not None and ema.use_for_validation)
        sums: dict[str, float] = {}
        count = 0
        st = self.o.state
        if not self.chunk:
            st.val_epoch = 0
        with torch.random.fork_rng(devices=[]), torch.no_grad(), averaged:
            empty = 0
            while limit is None or count < limit:
                self.val_loader.set_epoch(st.val_epoch)
                got = 0
                for batch in self.val_loader:
                    batch = _to_device(batch, self.o.device)
                    for t in trainers:
                        for k, v in _floats(t.val_step(batch, self.ctx) or {}).items():
                            sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    got += 1
                    if limit is not None and count >= limit:
                        break
                if limit is not None and count >= limit:
                    break
                st.val_epoch += 1  # this pass over the validation set ended
                empty = empty + 1 if got == 0 else 0
                if limit is None or empty >= 2:
                    break
        for n, m in self.o.modules.items():
            m.train(modes[n])
        values = average({k: v / max(count, 1) for k, v in sums.items()}, self.o.dist)
        self.metrics.set_val(self.o.state.step_batches, values)
        self._plateau_schedulers(validated=True)

    @contextlib.contextmanager
    def _ema_weights(self, use: bool) -> Iterator[None]:
        """Each averaged module with the EMA's parameters in place of its own (`use`), its own put back
        bitwise afterwards: samples and validation of the averaged model, training untouched."""
        ema = self.o.ema if use else {}
        own = {n: [p.detach().clone() for p in self.o.modules[n].parameters()] for n in ema}
        with torch.no_grad():
            for n, e in ema.items():
                for p, q in zip(self.o.modules[n].parameters(), e.module.parameters(), strict=True):
                    p.copy_(q)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, saved in own.items():
                    for p, q in zip(self.o.modules[n].parameters(), saved, strict=True):
                        p.copy_(q)

    # ----------------------------------------------------------------------------- samples
    def sample(self) -> None:
        """Each trainer's `sample(ctx)` picture (H x W x 3 uint8) as a PNG in `samples/` of the run
        folder, on rank 0, in eval mode, without gradients and with torch's RNG forked (training's
        random stream is the same with or without samples)."""
        pairs = zip(self.step.trainers, self.trainers, strict=True)
        named = [(n, t) for n, t in pairs if hasattr(t, "sample")]
        if not named or not self.o.dist.main:
            return
        from PIL import Image

        from prep.formats.atomic import write_bytes_atomic

        modes = {n: m.training for n, m in self.o.modules.items()}
        for m in self.o.modules.values():
            m.eval()
        ema = self.step.ema
        try:
            with (
                torch.random.fork_rng(devices=[]),
                torch.no_grad(),
                self._ema_weights(ema is not None and ema.use_for_samples),
            ):
                for name, trainer in named:
                    picture = trainer.sample(self.ctx)
                    if picture is None:
                        continue
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(picture)).save(buf, format="PNG")
                    st = self.o.state
                    file = f"{self.index:02d}-{self.step.name}-{st.global_batches:07d}-{name}.png"
                    path = self.o.dir / "samples" / file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(path, buf.getvalue())
        finally:
            for n, m in self.o.modules.items():
                m.train(modes[n])

    # ------------------------------------------------------------------------------ saving
    def save(self, step_end: bool = False) -> None:
        o, st = self.o, self.o.state
        rngs = gather(_rng_state(), o.dist)
        if not o.dist.main:
            barrier(o.dist)
            return
        in_step = not step_end
        fingerprints = list(self._saved_fingerprints())
        meta = {
            "state": asdict(st),
            "in_step": in_step,
            "step_name": self.step.name,
            "fingerprints": fingerprints,
            "transition": self.transition.state_dict(),
            "metrics": self.metrics.state_dict(),
            "world_size": o.dist.world,
            "prep_version": _version(),
        }
        if in_step:  # matched by name on resume (torch matches by position)
            meta["optimizer_params"] = o._optimizer_params(self.ctx.optimizers)
        payload: dict[str, Any] = {
            "format": ckpt.FORMAT,
            "meta": json.dumps(meta),
            "modules": {n: m.state_dict() for n, m in o.modules.items()},
            "trainers": {n: t.state_dict() for n, t in o.trainers.items() if hasattr(t, "state_dict")},
            "ema": {n: e.state_dict() for n, e in o.ema.items()},
            "rng": rngs,
            "carry": o._carry,
        }
        if in_step:
            payload["optimizers"] = {n: opt.state_dict() for n, opt in self.ctx.optimizers.items()}
            payload["schedulers"] = {n: s.state_dict() for n, s in self.ctx.schedulers.items()}
            payload["scaler"] = self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None
            payload["loader"] = json.dumps(self.loader.state_dict())
            payload["val_loader"] = json.dumps(self.val_loader.state_dict()) if self.val_loader else None
        if step_end:
            ckpt.write(o.dir, ckpt.step_end_name(self.index, st.global_batches, self.step.name), payload)
        else:
            ckpt.write(o.dir, ckpt.regular_name(st.global_batches), payload)
            ckpt.prune(o.dir, o.keep_last)
        barrier(o.dist)

    def _saved_fingerprints(self) -> Iterator[dict[str, Any]]:
        """Fingerprint documents of the steps run so far (this one with its loader's fingerprint)."""
        for i in range(self.index):
            yield self.o._docs(i, None)
        yield self.doc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prep")
    except PackageNotFoundError:
        return "unknown"


class _Progress:
    """A rich progress bar on rank 0 (step k/n, epoch, batch, samples/s, metrics); silent otherwise."""

    def __init__(
        self,
        orch: TrainingPipelineOrchestrator,
        index: int,
        step: StepConfig,
        epochs: int | None,
        batches: int | None,
        epoch_batches: int | None,
    ) -> None:
        self.o, self.index, self.step = orch, index, step
        self.total = (
            batches if batches is not None else (epochs * epoch_batches if epochs and epoch_batches else None)
        )
        self.enabled = orch.progress and orch.dist.main
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._s0 = orch.state.step_samples

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            # the step's name, bar and counts keep their width; the metrics line is cut at its end
            self._bar = Progress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}",
                           table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                expand=True,
                console=self.o.console or Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            n = len(self.o.cfg.steps)
            self._task = self._bar.add_task(
                f"step {self.index + 1}/{n} {self.step.name}",
                total=self.total,
                completed=self.o.state.step_batches,
                info="",
            )
        return self

    def update(self, metrics: Metrics) -> None:
        if self._bar is None:
            return
        st = self.o.state
        rate = (st.step_samples - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in list(metrics.averages().items())[:4])
        self._bar.update(
            self._task,
            completed=st.step_batches,
            info=f"{shown}  ep {st.step_epoch} b {st.batch_in_epoch}  {rate:,.0f} sp/s",
        )

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
