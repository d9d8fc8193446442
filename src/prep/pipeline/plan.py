"""The plan of a pipeline: what each step will do, computed before any GPU hour is spent.

`make_plan` builds each step's loader tree (reading manifests and `.idx` files, not samples), resolves
batch size and workers with where each came from, and derives sizes, lengths, cadences and the step's
fingerprint. It is pure apart from that reading; `render_plan` prints it as a rich table and
`StepPlan.to_json` gives the same for machines. `step_length` is the one place a step's length in
epochs, batches and samples is computed (the orchestrator stops and sizes `T_max: auto` by it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prep.errors import PrepError
from prep.pipeline.config import PipelineConfig, StepConfig
from prep.pipeline.durations import Duration
from prep.pipeline.fingerprint import doc_hash, step_doc
from prep.pipeline.resolve import Resolved

if TYPE_CHECKING:
    from prep.loaders import ChunkPlan


@dataclass(frozen=True)
class Length:
    """A step's planned length; None where it needs a size that is unknown. `rule` says which key set it."""

    epochs: float | None
    batches: int | None
    samples: int | None
    rule: str


def step_length(
    step: StepConfig, batches_per_epoch: int | None, samples_per_epoch: int | None, batch: int | None = None
) -> Length:
    """The length from `n_epochs` / `max_steps` / `duration`, else from the transition's cap. `batch`:
    samples per global batch (`batch_samples`), else the epoch's average batch is used."""
    tr = step.transition_on
    if step.n_epochs is not None:
        d, rule = Duration(step.n_epochs, "ep"), f"n_epochs {step.n_epochs}"
    elif step.max_steps is not None:
        d, rule = Duration(step.max_steps, "ba"), f"max_steps {step.max_steps}"
    elif step.duration is not None:
        d, rule = step.duration, f"duration {step.duration}"
    elif tr.max_epochs is not None:
        d, rule = Duration(tr.max_epochs, "ep"), f"transition_on.max_epochs {tr.max_epochs}"
    else:
        assert tr.max_steps is not None  # validated: a step has a length
        d, rule = Duration(tr.max_steps, "ba"), f"transition_on.max_steps {tr.max_steps}"
    if d.unit == "ep":
        batches = d.value * batches_per_epoch if batches_per_epoch is not None else None
        samples = d.value * samples_per_epoch if samples_per_epoch is not None else None
        return Length(float(d.value), batches, samples, rule)
    average = samples_per_epoch / batches_per_epoch if samples_per_epoch and batches_per_epoch else None
    if d.unit == "ba":
        batches, samples = d.value, (round(d.value * average) if average else None)
    else:  # samples, in whole batches of the batch size
        per_batch = batch or (round(average) if average else None)
        batches, samples = (-(-d.value // per_batch) if per_batch else None), d.value
    epochs = batches / batches_per_epoch if batches is not None and batches_per_epoch else None
    return Length(epochs, batches, samples, rule)


def batch_samples(
    sizes: list[tuple[str, Resolved]], world_size: int, bpe: int | None, spe: int | None
) -> int | None:
    """Samples per global batch, for durations and cadences in samples: the batch size x ranks when every
    batch-making dataset of the step (`resolve_batch_sizes`) has the same one; else (a blend of several
    sizes) the epoch's average batch; None when unknown. (The average alone is off with a short last
    batch: 21 samples in batches of 5 average 4.2, so 10sp were 3 batches.)"""
    values = {r.value for _, r in sizes}
    if len(values) == 1:
        return values.pop() * world_size
    return max(1, round(spe / bpe)) if spe and bpe else None


@dataclass
class StepPlan:
    index: int
    name: str
    dataset: str | None
    tree: str | None
    batch_size: list[tuple[str, Resolved]]
    workers: Resolved | None
    world_size: int
    samples_per_epoch: int | None
    batches_per_epoch: int | None
    length: Length | None
    trainers: list[str]
    freeze: list[str]
    unfreeze: list[str]
    trains: list[str]  # `StepConfig.trained_modules`: what the run trains in this step
    frozen: list[str] | None  # every other declared module (None: the modules are not declared)
    optimizers: list[str]
    schedulers: list[str]
    transition: str
    validation: str | None
    checkpoint_every: str | None
    chunking: str | None
    fingerprint: str | None
    fingerprint_doc: dict[str, Any] | None = None
    problems: list[PrepError] = field(default_factory=list)
    warnings: list[PrepError] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["problems"] = [p.line() for p in self.problems]
        doc["warnings"] = [w.line() for w in self.warnings]
        doc["batch_size"] = [{"dataset": n, "value": r.value, "from": r.source} for n, r in self.batch_size]
        doc["workers"] = {"value": self.workers.value, "from": self.workers.source} if self.workers else None
        doc.pop("fingerprint_doc")
        return doc


def _transition(step: StepConfig) -> str:
    tr = step.transition_on
    caps = ", ".join(f"{k} {getattr(tr, k)}" for k in ("max_epochs", "max_steps") if getattr(tr, k))
    every = f", checked every {tr.check_every}" if tr.check_every else ", checked at epoch ends"
    if tr.mode == "loss_threshold":
        op = "<" if tr.direction == "min" else ">"
        text = f"{tr.source} {tr.metric} {op} {tr.threshold} for {tr.patience} checks{every}"
    elif tr.mode == "plateau":
        text = f"{tr.source} {tr.metric} plateau (min_delta {tr.min_delta}, patience {tr.patience}){every}"
    else:
        text = f"{tr.mode} (the step's length)"
    return f"{text}; cap {caps}" if caps else text


def _kwargs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _declared_size(ds: Any) -> int | None:
    """FluxFlow's `webdataset_size` (or samples per shard x shards in the URL pattern): the plan's
    estimate when the data was not opened (`--no-data`); an opened source counts its own samples."""
    from prep.loaders.io.sources import expand_braces
    from prep.pipeline.config import WebDatasetConfig

    if not isinstance(ds, WebDatasetConfig):
        return None
    if ds.webdataset_size is not None:
        return ds.webdataset_size
    if ds.webdataset_samples_per_shard is not None:
        return ds.webdataset_samples_per_shard * len(expand_braces(ds.webdataset_url))
    return None


def counted_in_epochs(length: Length) -> bool:
    """Whether a step's length counts epochs (n_epochs, a duration in ep, the max_epochs cap)."""
    rule = length.rule
    return rule.startswith(("n_epochs", "transition_on.max_epochs")) or (
        rule.startswith("duration") and rule.endswith("ep")
    )


def _unchecked_problems(
    cfg: PipelineConfig, index: int, epoch_batches: int | None, length: Length
) -> list[PrepError]:
    """A rule checked at epoch ends (no `check_every`) on a step counted in batches that ends at or
    before its first epoch end, or whose data has no epoch end: it could never fire."""
    tr = cfg.steps[index].transition_on
    if tr.mode not in ("loss_threshold", "plateau") or tr.check_every is not None or length.batches is None:
        return []
    if counted_in_epochs(length) or (epoch_batches is not None and length.batches > epoch_batches):
        return []
    first = (
        f"before its first epoch end ({epoch_batches:,} batches)"
        if epoch_batches is not None
        else "and its data has no epoch end (it repeats)"
    )
    path = ("steps", str(index), "transition_on")
    return [
        PrepError(
            f"{cfg.dotted(path)}: {tr.mode} is checked at epoch ends (no check_every), but the step ends "
            f"after {length.batches:,} batches, {first}: it never fires",
            cfg.place(path),
            f"set transition_on.check_every (e.g. {max(1, length.batches // 10)}ba)",
        )
    ]


def _cap_problems(cfg: PipelineConfig, index: int, bpe: int | None, length: Length) -> list[PrepError]:
    """A transition cap in the other unit than the step's length (max_epochs on a step counted in
    batches, or max_steps on one counted in epochs): compared once the epoch's size is known (caps in
    the same unit are checked with the config)."""
    tr = cfg.steps[index].transition_on
    out: list[PrepError] = []
    if not bpe or length.batches is None:
        return out
    for cap, per in (("max_epochs", bpe), ("max_steps", 1)):
        value = getattr(tr, cap)
        if value is None or length.rule.startswith(f"transition_on.{cap}") or value * per == length.batches:
            continue
        if counted_in_epochs(length) == (cap == "max_epochs"):
            continue  # same unit: the config check reported it
        side = "above" if value * per > length.batches else "below"
        effect = (
            "the step ends first, so the cap never applies"
            if side == "above"
            else ("the cap stops the step before its length")
        )
        path = ("steps", str(index), "transition_on", cap)
        out.append(
            PrepError(
                f"{cfg.dotted(path)}: {cap}={value} ({value * per:,} batches) is {side} the step's length "
                f"({length.rule} = {length.batches:,} batches): {effect}",
                cfg.place(path),
                "make them agree",
            )
        )
    return out


def checkpoint_warning(
    cfg: PipelineConfig,
    index: int,
    length: Length,
    epoch_batches: int | None,
    global_batch: int | None,
    sized: bool,
) -> PrepError | None:
    """A step that writes no checkpoint before its end, told to `validate` and `run` (a warning, not a
    problem: nothing is wrong until a run is killed, which then trains the whole step again): no
    `checkpoint_every` and no epoch end inside the step (one epoch, or a count of batches up to an epoch
    or on data that repeats without epochs), or a `checkpoint_every` that comes at or after its end.
    None when a checkpoint falls inside, when the step is one batch, or when the sizes that would tell
    are unknown (`sized`: the data was opened, so a missing `epoch_batches` means it has no epoch end)."""
    step = cfg.steps[index]
    every = step.checkpoint_every or Duration(1, "ep")
    by_epochs = counted_in_epochs(length)
    total = (
        (int(length.epochs) * epoch_batches if length.epochs is not None and epoch_batches else None)
        if by_epochs
        else length.batches
    )
    if total is not None and total <= 1:
        return None
    if every.unit == "ep" and epoch_batches is None:
        if by_epochs and length.epochs is not None:  # the epoch's size unknown: epochs against epochs
            inside = length.epochs > every.value
        elif sized:
            inside = False  # data without epoch ends has no epoch-end checkpoint
        else:
            return None
    else:
        first = every.to_batches(epoch_batches, global_batch)
        if first is None or total is None:
            return None
        k = step.grad_accumulation  # a checkpoint waits for the end of an accumulation window
        inside = -(-first // k) * k < total
    if inside:
        return None
    path = ("steps", str(index), "checkpoint_every")
    size = [f"{_n(length.epochs)} ep"] if length.epochs is not None else []
    size += [f"{_n(total)} ba"] if total is not None else []
    if step.checkpoint_every is not None:
        cadence = f"checkpoint_every {every} comes at or after its end"
    elif epoch_batches is None and not by_epochs:
        cadence = "no checkpoint_every, and the default, every epoch end, never comes: the data repeats"
    else:
        cadence = "no checkpoint_every, and the default, every epoch end, comes at or after its end"
    return PrepError(
        f"step {step.name!r} ({' = '.join(size) or '?'}, {length.rule}) writes no checkpoint before its end "
        f"({cadence}): a run killed in it trains the whole step again",
        cfg.place(path),
        f"set {cfg.dotted(path)} shorter than the step (e.g. {max(1, total // 10) if total else 1000}ba)",
    )


def step_chunks(step: StepConfig, train_batches: int | None, val_batches: int | None) -> ChunkPlan:
    """A step's chunked-training plan: `resolve_chunk_config` over its validation keys (a chunk size beats
    its limit, the missing one is inferred); not chunked when the step sets no chunk size."""
    from prep.loaders import resolve_chunk_config

    v = step.validation
    if v is None:
        return resolve_chunk_config(train_batches=train_batches, val_batches=val_batches)
    return resolve_chunk_config(
        train_chunk_size=v.train_chunk_size,
        val_chunk_size=v.val_chunk_size,
        limit_train_batches=v.limit_train_batches,
        limit_val_batches=v.limit_val_batches,
        train_batches=train_batches,
        val_batches=val_batches,
    )


def require_batches(cfg: PipelineConfig, index: int, name: str, bpe: int | None, spe: int | None) -> None:
    """Refuse a dataset of step `index` (its data, or its validation data) that makes no batch in an
    epoch (fewer samples than a batch, the short one dropped): the step would train or validate on
    nothing (and chunking failed with 'val_batches=0 is not a positive number')."""
    if bpe != 0:
        return
    step = cfg.steps[index].name
    raise PrepError(
        f"{cfg.dotted(('steps', str(index)))}: step {step!r}: dataset {name!r} gives no batch per epoch "
        f"({spe} samples per epoch: fewer than one batch per rank, and the short one is dropped)",
        cfg.place(("datasets", name)),
        "lower its batch_size, or set drop_last: false",
    )


def train_batches_per_epoch(cfg: PipelineConfig, index: int, bpe: int | None, chunked: bool) -> int | None:
    """Batches step `index` trains per epoch of `bpe` batches: `validation.limit_train_batches` cuts it
    (Lightning's convention, `limit_to_batches`: a count above the epoch is the epoch, a float a fraction
    of it); chunking ignores the limit (a chunk size beats it). A limit that leaves no batch is refused."""
    from prep.loaders.chunked import limit_to_batches

    v = cfg.steps[index].validation
    if v is None or v.limit_train_batches is None or chunked or bpe is None:
        return bpe
    n = limit_to_batches(v.limit_train_batches, bpe)
    if n == 0:
        path = ("steps", str(index), "validation", "limit_train_batches")
        raise PrepError(
            f"{cfg.dotted(path)}: limit_train_batches={v.limit_train_batches} leaves no batch of the "
            f"epoch's {bpe}",
            cfg.place(path),
            f"raise it to at least {1 / bpe:.3g} (or a count of batches), or remove it",
        )
    return n


def make_plan(
    cfg: PipelineConfig,
    *,
    args: Mapping[str, int | None] | None = None,
    build: bool = True,
    world_size: int = 1,
) -> list[StepPlan]:
    """One StepPlan per step. `build=False` skips the data (no sizes, no loader fingerprint)."""
    from prep.pipeline.data import build_dataset, resolve_batch_sizes, resolve_workers

    plans: list[StepPlan] = []
    modules = cfg.module_names
    for i, step in enumerate(cfg.steps):
        name = cfg.step_dataset(i)
        problems: list[PrepError] = []
        built = val = None
        if build and name is not None:
            try:
                built = build_dataset(cfg, name, step=step, args=args, rank=0, world_size=world_size)
            except PrepError as err:
                problems.append(err)
            if step.validation is not None:
                try:
                    val = build_dataset(
                        cfg,
                        step.validation.dataset,
                        args=args,
                        rank=0,
                        world_size=world_size,
                        batch_size=step.validation.batch_size,
                    )
                except PrepError as err:
                    problems.append(err)
        bpe = built.batches_per_epoch if built else None
        spe = built.samples_per_epoch if built else None
        sizes = resolve_batch_sizes(cfg, name, step=step, args=args) if name in cfg.datasets else []
        if built is None and name in cfg.datasets and (guess := _declared_size(cfg.datasets[name])):
            spe = guess
            bpe = -(-guess // (sizes[0][1].value * world_size))
        empty = False
        for data, b in ((name, built), (step.validation and step.validation.dataset, val)):
            try:
                if b is not None:
                    require_batches(cfg, i, str(data), b.batches_per_epoch, b.samples_per_epoch)
            except PrepError as err:
                problems.append(err)
                empty = True
        global_batch = batch_samples(sizes, world_size, bpe, spe)
        length = step_length(step, bpe, spe, global_batch)
        if built is not None and bpe is None and (length.epochs is not None and length.batches is None):
            problems.append(
                PrepError(
                    f"step {step.name!r}: dataset {name!r} has no epoch (it repeats endlessly), so "
                    f"{length.rule} cannot end",
                    cfg.place(("steps", str(i))),
                    "give the dataset epoch_length, or give the step max_steps / a duration in ba or sp",
                )
            )
        problems += _cap_problems(cfg, i, bpe, length)
        chunking = None
        v = step.validation
        if v is not None:
            try:
                chunk = step_chunks(step, bpe, val.batches_per_epoch if val else None)
                if chunk.chunked:
                    chunking = (
                        f"chunks of {chunk.train_chunk_size} train / {chunk.val_chunk_size} val batches"
                        + (f" ({'; '.join(chunk.notes)})" if chunk.notes else "")
                    )
            except PrepError as err:
                if built is not None and not empty:  # without the data, the partition sizes are unknown
                    problems.append(PrepError(err.what, cfg.place(("steps", str(i), "validation")), err.fix))
        chunked = v is not None and (v.train_chunk_size is not None or v.val_chunk_size is not None)
        try:
            epoch_batches = train_batches_per_epoch(cfg, i, bpe, chunked)
        except PrepError as err:
            problems.append(err)
            epoch_batches = bpe
        if built is not None or bpe is not None:  # an epoch's size is known, or it has none
            problems += _unchecked_problems(cfg, i, epoch_batches, length)
        warning = checkpoint_warning(cfg, i, length, epoch_batches, global_batch, sized=built is not None)
        doc = step_doc(
            cfg,
            i,
            batch_sizes={n: r.value * world_size for n, r in sizes},
            loader=built.node.fingerprint() if built else None,
        )
        opt = step.optimization
        plans.append(
            StepPlan(
                index=i,
                name=step.name,
                dataset=name,
                tree=built.description if built else None,
                batch_size=sizes,
                workers=resolve_workers(cfg, name, step, args) if name in cfg.datasets else None,
                world_size=world_size,
                samples_per_epoch=spe,
                batches_per_epoch=bpe,
                length=length,
                trainers=step.trainers,
                freeze=list(step.freeze),
                unfreeze=list(step.unfreeze),
                trains=(trains := step.trained_modules),
                frozen=[m for m in modules if m not in trains] if modules is not None else None,
                optimizers=[
                    f"{n}: {o.type}({_kwargs(o.kwargs)}) on {', '.join(o.params or [n])}"
                    for n, o in opt.optimizers.items()
                ],
                schedulers=[f"{n}: {s.type}({_kwargs(s.kwargs)})" for n, s in opt.schedulers.items()],
                transition=_transition(step),
                validation=(f"{v.dataset} every {v.every or 'epoch'}" if v is not None else None),
                checkpoint_every=str(step.checkpoint_every) if step.checkpoint_every else None,
                chunking=chunking,
                fingerprint=doc_hash(doc),
                fingerprint_doc=doc,
                problems=problems,
                warnings=[warning] if warning is not None else [],
            )
        )
    return plans


def _n(x: float | int | None) -> str:
    if x is None:
        return "?"
    return f"{x:,.2f}".rstrip("0").rstrip(".") if isinstance(x, float) else f"{x:,}"


def render_plan(plans: list[StepPlan], console: Any, title: str = "pipeline plan") -> None:
    """One two-column table per step (a wide table of ten columns wraps beyond reading)."""
    from rich.table import Table
    from rich.text import Text

    console.print(Text(title, style="bold"))
    for p in plans:
        table = Table(
            title=f"step {p.index + 1}/{len(plans)}: {p.name}",
            title_justify="left",
            show_header=False,
            header_style="bold",
        )
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        if len(p.batch_size) == 1:
            bs = str(p.batch_size[0][1])
        else:
            bs = "; ".join(f"{n} {r}" for n, r in p.batch_size) or "?"
        length = p.length
        rows = [
            ("data", p.tree or p.dataset or "-"),
            ("batch size", f"{bs} per rank, {p.world_size} rank(s)"),
            ("workers", str(p.workers) if p.workers else "?"),
            ("per epoch", f"{_n(p.samples_per_epoch)} samples, {_n(p.batches_per_epoch)} batches"),
            (
                "length",
                f"{_n(length.epochs)} ep = {_n(length.batches)} ba = {_n(length.samples)} sp ({length.rule})"
                if length
                else "?",
            ),
            ("train", ", ".join(p.trainers) or "-"),
            ("trained modules", ", ".join(p.trains) or "none"),
            ("frozen modules", "every other one" if p.frozen is None else ", ".join(p.frozen) or "none"),
            ("optimizers", "\n".join(p.optimizers) or "-"),
            ("schedulers", "\n".join(p.schedulers) or "-"),
            ("transition", p.transition),
            ("validation", (p.validation or "-") + (f"; {p.chunking}" if p.chunking else "")),
            ("checkpoints", f"every {p.checkpoint_every or 'epoch'}"),
            ("fingerprint", p.fingerprint or "-"),
        ]
        for key, value in rows:
            table.add_row(key, Text(value))
        console.print(table)
