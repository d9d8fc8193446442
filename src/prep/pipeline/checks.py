"""Cross-checks of a parsed pipeline: what the schema alone cannot see.

Each check returns (key path below the pipeline section, what is wrong, how to fix it); the caller
places them at their lines and reports them all at once. Modules and trainers exist only at run time,
so the checks that need them run only when they are declared (`modules:`/`trainers:` in the YAML, or
by the caller).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prep.pipeline.config import (
    COMPOSITE_TYPES,
    DatasetConfig,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
    StepConfig,
    WebDatasetConfig,
    dataset_refs,
)

Problem = tuple[tuple[str, ...], str, str]
AUTO_KWARGS = frozenset({"T_max", "total_steps", "total_iters"})
_TOKEN_SCHEMES = ("http://", "https://", "hf://")


def _suggest(name: str, known: Sequence[str]) -> str:
    same = [k for k in known if k.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_config(
    base: PipelineConfig,
    datasets: Mapping[str, DatasetConfig],
    steps: Sequence[StepConfig | None],
    modules: Sequence[str] | None,
    trainers: Mapping[str, Sequence[str]] | None,
    defined: Sequence[str] | None = None,
) -> list[Problem]:
    """`defined`: every dataset name of the config, also those that failed the schema (reported there;
    a reference to one is not an unknown name). Default: the names of `datasets`."""
    names = list(defined) if defined is not None else list(datasets)
    out: list[Problem] = []
    out += _check_datasets(datasets, names)
    if base.default_dataset is not None:
        out += _unknown_dataset(("default_dataset",), base.default_dataset, names)
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step is None:
            continue
        if step.name in seen:
            out.append(
                (
                    ("steps", str(i), "name"),
                    f"step name {step.name!r} is also step {seen[step.name]}'s",
                    "give every step its own name (checkpoints and resume name steps)",
                )
            )
        seen.setdefault(step.name, i)
        out += [
            (("steps", str(i), *p), w, f)
            for p, w, f in _check_step(step, base.default_dataset, names, modules, trainers)
        ]
    return out


# ------------------------------------------------------------------------------------------ datasets
def _unknown_dataset(path: tuple[str, ...], ref: str, names: Sequence[str]) -> list[Problem]:
    if ref in names:
        return []
    return [
        (
            path,
            f"names no dataset: {ref!r}{_suggest(ref, names)}",
            f"use one of: {', '.join(names) or '(no datasets defined)'}",
        )
    ]


def _check_datasets(datasets: Mapping[str, DatasetConfig], names: Sequence[str]) -> list[Problem]:
    out: list[Problem] = []
    for name, ds in datasets.items():
        for path, ref in dataset_refs(ds):
            out += _unknown_dataset(("datasets", name, *path), ref, names)
        if isinstance(ds, WebDatasetConfig):
            url = ds.webdataset_url
            if url.startswith("pipe:") and not ds.allow_pipe:
                out.append(
                    (
                        ("datasets", name, "webdataset_url"),
                        "pipe: sources run shell commands and are off by default",
                        "set allow_pipe: true if you trust this command",
                    )
                )
            if ds.webdataset_token is not None and not url.startswith(_TOKEN_SCHEMES):
                out.append(
                    (
                        ("datasets", name, "webdataset_token"),
                        "a token is sent only to http(s):// and hf:// sources; this source would ignore it",
                        "remove the token (local and pipe: sources need none; s3:// reads its own "
                        "credentials)",
                    )
                )
        if ds.transform is not None:
            problem = _import_problem(ds.transform)
            if problem:
                out.append((("datasets", name, "transform"), problem, "name an importable module:callable"))
    out += _cycles(datasets)
    return out


def _cycles(datasets: Mapping[str, DatasetConfig]) -> list[Problem]:
    """Each cycle among composite datasets, once, reported at the first member (in file order)."""
    out: list[Problem] = []
    reported: set[frozenset[str]] = set()
    order = list(datasets)

    def visit(name: str, stack: list[str]) -> None:
        ds = datasets.get(name)
        if ds is None or ds.type not in COMPOSITE_TYPES:
            return
        for _, ref in dataset_refs(ds):
            if ref in stack:
                cycle = [*stack[stack.index(ref) :], ref]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    first = min(cycle[:-1], key=order.index)
                    out.append(
                        (
                            ("datasets", first),
                            f"datasets refer to each other in a cycle: {' -> '.join(cycle)}",
                            "break the cycle: a blend, mix or concat cannot contain itself",
                        )
                    )
            else:
                visit(ref, [*stack, ref])

    for name in datasets:
        visit(name, [name])
    return out


def _import_problem(spec: str) -> str | None:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        return f"cannot import {module} ({err})"
    except AttributeError:
        return f"{module} has no {attr}"
    return None if callable(fn) else f"{spec} is not callable"


def import_callable(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------- steps
def _check_step(
    step: StepConfig,
    default_dataset: str | None,
    datasets: Sequence[str],
    modules: Sequence[str] | None,
    trainers: Mapping[str, Sequence[str]] | None,
) -> Iterator[Problem]:
    if step.dataset is not None:
        yield from _unknown_dataset(("dataset",), step.dataset, datasets)
    if step.dataset is None and default_dataset is None:
        yield (
            ("name",),
            f"step {step.name!r} has no dataset and the pipeline has no default_dataset",
            "set dataset: NAME on the step, or default_dataset: NAME on the pipeline",
        )
    if step.validation is not None:
        yield from _unknown_dataset(("validation", "dataset"), step.validation.dataset, datasets)
    yield from _check_length(step)
    yield from _check_transition(step, trainers)
    yield from _check_modules(step, modules)
    if trainers is not None:
        for t in step.trainers:
            if t not in trainers:
                yield (
                    ("train",),
                    f"trainer {t!r} is not declared{_suggest(t, list(trainers))}",
                    f"use one of: {', '.join(trainers) or '(none declared)'}",
                )
    opt = step.optimization
    for name, o in opt.optimizers.items():
        yield from ((("optimization", "optimizers", name, *p), w, f) for p, w, f in _check_optimizer(o))
    for name, s in opt.schedulers.items():
        path = ("optimization", "schedulers", name)
        if name not in opt.optimizers:
            yield (
                path,
                f"schedules no optimizer of this step: {name!r}{_suggest(name, list(opt.optimizers))}",
                "name the scheduler after the optimizer it drives",
            )
        yield from (((*path, *p), w, f) for p, w, f in _check_scheduler(s))
        if s.monitor is not None:
            yield from _unreported((*path, "monitor"), s.monitor, step, trainers)


def _check_length(step: StepConfig) -> Iterator[Problem]:
    given = [k for k in ("n_epochs", "max_steps", "duration") if getattr(step, k) is not None]
    tr = step.transition_on
    if len(given) > 1:
        yield (
            (given[1],),
            f"the step's length is given twice ({' and '.join(given)})",
            "keep one of n_epochs, max_steps, duration",
        )
    if not given and tr.max_epochs is None and tr.max_steps is None:
        yield (
            ("name",),
            f"step {step.name!r} has no length",
            "set n_epochs, max_steps or duration (e.g. 10ep, 5000ba, 2e6sp)",
        )
    epochs = step.n_epochs or (step.duration.value if step.duration and step.duration.unit == "ep" else None)
    batches = step.max_steps or (
        step.duration.value if step.duration and step.duration.unit == "ba" else None
    )
    length_key = given[0] if given else None
    for cap, length, unit in (("max_epochs", epochs, "epochs"), ("max_steps", batches, "batches")):
        value = getattr(tr, cap)
        if value is None or length is None:
            continue
        if value > length:
            yield (
                ("transition_on", cap),
                f"{cap}={value} is above the step's length ({length_key} = "
                f"{length} {unit}): the step ends first, so the cap never applies",
                f"lower {cap} to {length} or less, or lengthen the step",
            )
        elif value < length:
            yield (
                ("transition_on", cap),
                f"{cap}={value} is below the step's length ({length_key} = "
                f"{length} {unit}): the cap stops the step before its length",
                f"drop {cap} or set {length_key} to {value}",
            )


# the keys of `transition_on` each mode reads (the caps are every mode's, and check_every also paces
# ReduceLROnPlateau schedulers)
_RULE_KEYS: dict[str, frozenset[str]] = {
    "epoch": frozenset(),
    "max_steps": frozenset(),
    "loss_threshold": frozenset({"metric", "source", "threshold", "direction", "patience"}),
    "plateau": frozenset({"metric", "source", "direction", "patience", "min_delta"}),
}


def _check_transition(step: StepConfig, trainers: Mapping[str, Sequence[str]] | None) -> Iterator[Problem]:
    tr = step.transition_on
    rule_keys = frozenset().union(*_RULE_KEYS.values())
    for key in sorted((tr.model_fields_set & rule_keys) - _RULE_KEYS[tr.mode]):
        readers = [m for m, keys in _RULE_KEYS.items() if key in keys]
        yield (
            ("transition_on", key),
            f"{key} means nothing to mode {tr.mode}: it would be ignored (read by mode "
            f"{' and '.join(readers)})",
            f"set mode: {readers[0]}, or remove {key}",
        )
    if tr.mode in ("loss_threshold", "plateau") and tr.metric is None:
        yield (("transition_on", "mode"), f"mode {tr.mode} needs a metric", "add metric: NAME")
    if tr.mode == "loss_threshold" and tr.threshold is None:
        yield (("transition_on", "mode"), "mode loss_threshold needs a threshold", "add threshold: VALUE")
    if (
        tr.mode == "max_steps"
        and step.max_steps is None
        and tr.max_steps is None
        and not (step.duration and step.duration.unit == "ba")
    ):
        yield (
            ("transition_on", "mode"),
            "mode max_steps needs max_steps (on the step or here)",
            "set max_steps",
        )
    if tr.source == "val" and step.validation is None:
        yield (
            ("transition_on", "source"),
            "a validation metric is watched but the step has no validation",
            "add validation: {dataset: ..., every: ...} or use source: train",
        )
    if tr.metric is not None:
        yield from _unreported(("transition_on", "metric"), tr.metric, step, trainers)


def _unreported(
    path: tuple[str, ...], metric: str, step: StepConfig, trainers: Mapping[str, Sequence[str]] | None
) -> Iterator[Problem]:
    """A watched metric (a transition's, a ReduceLROnPlateau's `monitor`) that none of the step's
    trainers reports: the rule would never fire, silently (FluxFlow accepted it)."""
    if trainers is None:
        return
    declared = sorted({m for t in step.trainers for m in trainers.get(t, ())})
    if metric not in declared:
        yield (
            path,
            f"no trainer of this step reports {metric!r}"
            f"{_suggest(metric, declared)} (they report: {', '.join(declared) or 'nothing'})",
            "watch a metric a trainer of this step reports, or train the trainer that reports it",
        )


def _check_modules(step: StepConfig, modules: Sequence[str] | None) -> Iterator[Problem]:
    trained: dict[str, tuple[str, ...]] = {}
    by: dict[str, str] = {}
    for name, o in step.optimization.optimizers.items():
        for i, m in enumerate(o.params if o.params is not None else [name]):
            path: tuple[str, ...] = (
                ("optimization", "optimizers", name, "params", str(i))
                if o.params is not None
                else ("optimization", "optimizers", name)
            )
            if by.setdefault(m, name) != name:  # torch.optim would let both step every parameter of it
                yield (
                    path,
                    f"module {m!r} is trained by optimizers {by[m]!r} and {name!r} of the same step "
                    "(each would step its parameters)",
                    f"name {m!r} in the params of one of them",
                )
            trained.setdefault(m, path)
    for i, m in enumerate(step.unfreeze):
        trained.setdefault(m, ("unfreeze", str(i)))
    frozen = set(step.freeze)
    for m, where in trained.items():
        if m in frozen:
            yield (
                where,
                f"module {m!r} is frozen and trained by the same step",
                f"remove {m!r} from freeze, or from this optimizer / unfreeze",
            )
    if modules is None:
        return
    for key in ("freeze", "unfreeze"):
        for i, m in enumerate(getattr(step, key)):
            if m not in modules:
                yield (
                    (key, str(i)),
                    f"names no module: {m!r}{_suggest(m, modules)}",
                    f"use one of: {', '.join(modules)}",
                )
    for name, o in step.optimization.optimizers.items():
        if o.params is None:
            if name not in modules:
                yield (
                    ("optimization", "optimizers", name),
                    f"optimizer {name!r} has no params and no module is called {name!r}",
                    "list the modules it trains: params: [module, ...]",
                )
            continue
        for i, m in enumerate(o.params):
            if m not in modules:
                yield (
                    ("optimization", "optimizers", name, "params", str(i)),
                    f"names no module: {m!r}{_suggest(m, modules)}",
                    f"use one of: {', '.join(modules)}",
                )
    if step.ema is not None and step.ema.modules is not None:
        for i, m in enumerate(step.ema.modules):
            if m not in modules:
                yield (
                    ("ema", "modules", str(i)),
                    f"names no module: {m!r}{_suggest(m, modules)}",
                    f"use one of: {', '.join(modules)}",
                )


# ------------------------------------------------------------------------------- torch.optim types
def optimizer_class(name: str) -> type | None:
    import torch.optim

    cls = getattr(torch.optim, name, None)
    ok = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    return cls if ok else None


def scheduler_class(name: str) -> type | None:
    from torch.optim import lr_scheduler

    cls = getattr(lr_scheduler, name, None)
    ok = (
        isinstance(cls, type)
        and cls is not lr_scheduler.LRScheduler
        and (issubclass(cls, lr_scheduler.LRScheduler) or cls is lr_scheduler.ReduceLROnPlateau)
    )
    return cls if ok else None


def _names(module: Any, accept: Any) -> list[str]:
    return sorted(n for n in dir(module) if not n.startswith("_") and accept(n))


def _signature_problems(cls: type, kwargs: Mapping[str, Any], skip: set[str]) -> Iterator[Problem]:
    params = dict(inspect.signature(cls).parameters)
    accepted = [
        n for n, p in params.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for k in kwargs:
        if k not in accepted:
            yield (
                (k,),
                f"{cls.__name__} takes no argument {k!r}{_suggest(k, accepted)}",
                f"its arguments are: {', '.join(accepted)}",
            )
    for n, p in params.items():
        if n in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if n not in kwargs:
            yield (("type",), f"{cls.__name__} needs argument {n!r}", f"add {n}: VALUE")


def _check_optimizer(o: OptimizerConfig) -> Iterator[Problem]:
    import torch

    cls = optimizer_class(o.type)
    if cls is None:
        known = _names(torch.optim, lambda n: optimizer_class(n) is not None)
        yield (
            ("type",),
            f"{o.type!r} is not a torch.optim optimizer{_suggest(o.type, known)}",
            f"use one of: {', '.join(known)}",
        )
        return
    problems = list(_signature_problems(cls, o.kwargs, {"self", "params"}))
    yield from problems
    if not problems:
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], **o.kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            yield (("type",), f"{o.type} refuses these arguments: {err}", "correct the argument values")


def _check_scheduler(s: SchedulerConfig) -> Iterator[Problem]:
    import torch
    from torch.optim import lr_scheduler

    cls = scheduler_class(s.type)
    if cls is None:
        known = _names(lr_scheduler, lambda n: scheduler_class(n) is not None)
        yield (
            ("type",),
            f"{s.type!r} is not a torch.optim.lr_scheduler scheduler{_suggest(s.type, known)}",
            f"use one of: {', '.join(known)}",
        )
        return
    for k, v in s.kwargs.items():
        if v == "auto" and k not in AUTO_KWARGS:
            yield (
                (k,),
                f"{k}: auto is only understood for {', '.join(sorted(AUTO_KWARGS))}",
                "write a number",
            )
    plateau = cls is lr_scheduler.ReduceLROnPlateau
    if plateau and s.monitor is None:
        yield (("type",), "ReduceLROnPlateau needs monitor: the metric it watches", "add monitor: METRIC")
    if not plateau and s.monitor is not None:
        yield (("monitor",), f"{s.type} watches no metric", "remove monitor")
    problems = list(_signature_problems(cls, s.kwargs, {"self", "optimizer"}))
    yield from problems
    if not problems:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        kwargs = {k: (1 if v == "auto" else v) for k, v in s.kwargs.items()}
        try:
            cls(opt, **kwargs)
        except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as err:
            yield (("type",), f"{s.type} refuses these arguments: {err}", "correct the argument values")
