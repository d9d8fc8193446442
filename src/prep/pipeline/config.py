"""The `training.pipeline` config: pydantic models, and `parse_pipeline_config`, which reports every
problem at once, each with its YAML path and line.

Loading reuses the stage configs' path (`prep.config`): YAML 1.2 scalars with a line for every key,
`--set` overrides, then `${...}` interpolation, so `${HF_TOKEN}` and `${env:VAR,default}` read the same
everywhere. Validation runs in two passes: the schema (types, unknown keys with a did-you-mean,
required keys), dataset by dataset and step by step so one broken step does not hide another; then the
cross-checks in `prep.pipeline.checks` (references, cycles, lengths, torch.optim signatures, modules,
metrics). Tokens are `SecretStr`: no message, plan or JSON ever shows one.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    StrictBool,
    ValidationError,
)

from prep.config import _SECRET_KEY, PrepErrorGroup, apply_override, interpolate, parse_yaml
from prep.errors import PrepError
from prep.models import ConfigModel
from prep.pipeline.durations import Duration, parse_duration


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a valid integer, not a boolean")
    return value


# ints accept "7" (what ${env:VAR} gives, as in the stage configs) but never true/false
Int = Annotated[int, BeforeValidator(_no_bool)]
PosInt = Annotated[Int, Field(gt=0)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
DurationField = Annotated[Duration, PlainValidator(parse_duration), PlainSerializer(str, return_type=str)]
Limit = NonNegInt | Annotated[float, Field(ge=0, le=1)]
TrainLimit = PosInt | Annotated[float, Field(gt=0, le=1)]  # 0 would train nothing

# FluxFlow's per-step booleans and the trainer names they select. `train_diff_full` is the flow trainer
# too (what "full" trains is the step's optimizers: a text_encoder optimizer trains the text encoder);
# `gan_training` and `train_spade` are options of the vae trainer (it reads them from the step).
TRAINER_ALIASES: dict[str, str] = {
    "train_vae": "vae",
    "train_diff": "flow",
    "train_diff_full": "flow",
}


class _Model(ConfigModel):
    # Unset keys stay None (never an explicit value: the schema refuses `key: null` for them), which is
    # how resolution tells "not set here" from every explicit value.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- datasets
class _DatasetBase(_Model):
    batch_size: PosInt = Field(None, description="samples per rank per batch")  # type: ignore[assignment]
    workers: NonNegInt = Field(None, description="DataLoader worker processes")  # type: ignore[assignment]
    seed: Int = Field(None, description="seed of this dataset's order")  # type: ignore[assignment]
    shuffle: StrictBool = Field(None, description="shuffle samples (leaves) each epoch")  # type: ignore[assignment]
    decode: Literal["raw", "pil", "uint8", "float"] = Field(
        None, description="how images are decoded"  # type: ignore[arg-type]
    )
    image_size: PosInt | Annotated[list[PosInt], Field(min_length=2, max_length=2)] = Field(  # type: ignore[assignment]
        None, description="resize to cover then crop to this size (int or [H, W])"
    )
    transform: str = Field(  # type: ignore[assignment]
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="per-sample function, module:callable"
    )
    drop_last: StrictBool = Field(None, description="skip each epoch's short last batch")  # type: ignore[assignment]
    epoch_length: PosInt = Field(  # type: ignore[assignment]
        None, description="batches per virtual epoch (EpochizeDataset); needed for endless mixes"
    )


class LocalDatasetConfig(_DatasetBase):
    type: Literal["local"]
    image_folder: str = Field(description="folder of images")
    captions_file: str = Field(description="NAME<TAB>CAPTION lines")


class WebDatasetConfig(_DatasetBase):
    type: Literal["webdataset"]
    webdataset_url: str = Field(description="tar URL pattern: https://, hf://, s3://, a local pattern, pipe:")
    webdataset_token: SecretStr | None = Field(None, description="bearer/hf token, sent only in headers")
    webdataset_image_key: str = "png"
    webdataset_label_key: str = "json"
    webdataset_caption_key: str = "prompt"
    webdataset_size: PosInt | None = Field(None, description="samples in all, for plans without an index")
    webdataset_samples_per_shard: PosInt | None = Field(None, description="for plans without an index")
    allow_pipe: StrictBool = False


class PrepDatasetConfig(_DatasetBase):
    type: Literal["prep"]
    path: str = Field(description="a prep shard folder, or its manifest.json")
    fields: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="member extensions to read (`jpg|png`: whichever exists); default: all"
    )


class SourceRef(_Model):
    dataset: str
    weight: PosFloat = 1.0
    sample_weight: PosFloat | None = None


class BlendDatasetConfig(_DatasetBase):
    type: Literal["blend"]
    sources: Annotated[list[SourceRef], Field(min_length=1)]
    schedule: Literal["random", "smooth"] = Field(None)  # type: ignore[arg-type]
    repeat: StrictBool = Field(None)  # type: ignore[assignment]


class MixDatasetConfig(_DatasetBase):
    type: Literal["mix"]
    sources: Annotated[list[SourceRef], Field(min_length=1)]
    counts: Literal["multinomial", "stratified"] = Field(None)  # type: ignore[arg-type]
    repeat: StrictBool = Field(None)  # type: ignore[assignment]


class ConcatDatasetConfig(_DatasetBase):
    type: Literal["concat"]
    datasets: Annotated[list[str], Field(min_length=1)]


DATASET_TYPES: dict[str, type[_DatasetBase]] = {
    "local": LocalDatasetConfig,
    "webdataset": WebDatasetConfig,
    "prep": PrepDatasetConfig,
    "blend": BlendDatasetConfig,
    "mix": MixDatasetConfig,
    "concat": ConcatDatasetConfig,
}
DatasetConfig = (
    LocalDatasetConfig
    | WebDatasetConfig
    | PrepDatasetConfig
    | BlendDatasetConfig
    | MixDatasetConfig
    | ConcatDatasetConfig
)
COMPOSITE_TYPES = ("blend", "mix", "concat")


def dataset_refs(ds: DatasetConfig) -> list[tuple[tuple[str, ...], str]]:
    """(key path inside the dataset, referenced name) of a composite's children."""
    if isinstance(ds, BlendDatasetConfig | MixDatasetConfig):
        return [(("sources", str(i), "dataset"), s.dataset) for i, s in enumerate(ds.sources)]
    if isinstance(ds, ConcatDatasetConfig):
        return [(("datasets", str(i)), n) for i, n in enumerate(ds.datasets)]
    return []


# ------------------------------------------------------------------------------------------------ steps
class OptimizerConfig(ConfigModel):
    """`type` names a torch.optim class; every other key except `params` is its keyword argument."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    params: list[str] | None = Field(None, description="modules whose trainable parameters it updates")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SchedulerConfig(ConfigModel):
    """`type` names a torch.optim.lr_scheduler class; `T_max`/`total_steps`/`total_iters` may be `auto`
    (the step's length in optimizer steps); `monitor` names the metric ReduceLROnPlateau watches."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    monitor: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizationConfig(_Model):
    optimizers: dict[str, OptimizerConfig] = Field(default_factory=dict)
    schedulers: dict[str, SchedulerConfig] = Field(default_factory=dict)


class TransitionConfig(_Model):
    mode: Literal["epoch", "max_steps", "loss_threshold", "plateau"] = "epoch"
    metric: str | None = None
    source: Literal["train", "val"] = Field(
        "train", description="a training moving average or a validation metric"
    )
    threshold: float | None = None
    direction: Literal["min", "max"] = Field("min", description="min: below threshold / lower is better")
    patience: PosInt = 1
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    max_epochs: PosInt | None = None
    max_steps: PosInt | None = None
    check_every: DurationField | None = None


class ValidationConfig(_Model):
    dataset: str
    every: DurationField | None = None
    batch_size: PosInt | None = None
    train_chunk_size: PosInt | None = None
    val_chunk_size: PosInt | None = None
    limit_train_batches: TrainLimit | None = None
    limit_val_batches: Limit | None = None


class EmaConfig(_Model):
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.999
    policy: Literal["keep", "reset"] = Field("keep", description="keep: carry the EMA into the next step")
    modules: list[str] | None = Field(None, description="modules to average (default: the trained ones)")
    use_for_samples: StrictBool = Field(True, description="sample grids from the averaged weights")
    use_for_validation: StrictBool = Field(True, description="validate the averaged weights")


class StepConfig(_Model):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    dataset: str | None = None
    n_epochs: PosInt | None = None
    max_steps: PosInt | None = None
    duration: DurationField | None = None
    train: list[str] = Field(default_factory=list)
    train_vae: StrictBool | None = None
    train_diff: StrictBool | None = None
    train_diff_full: StrictBool | None = None
    train_spade: StrictBool | None = None
    gan_training: StrictBool | None = None
    freeze: list[str] = Field(default_factory=list)
    unfreeze: list[str] = Field(default_factory=list)
    frozen_eval: StrictBool = Field(True, description="put frozen modules in eval() mode")
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    transition_on: TransitionConfig = Field(default_factory=TransitionConfig)
    validation: ValidationConfig | None = None
    checkpoint_every: DurationField | None = None
    sample_every: DurationField | None = Field(
        None, description="also write sample grids at this cadence (always at the step's end)"
    )
    batch_size: PosInt = Field(None)  # type: ignore[assignment]
    workers: NonNegInt = Field(None)  # type: ignore[assignment]
    carry_optimizer: StrictBool = False
    ema: EmaConfig | None = None
    grad_clip_norm: PosFloat | None = None
    grad_accumulation: PosInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    metrics_window: PosInt = 50

    @property
    def trainers(self) -> list[str]:
        """`train` plus FluxFlow's booleans (train_vae: true -> vae), in order, once each."""
        names = list(self.train)
        names += [t for k, t in TRAINER_ALIASES.items() if getattr(self, k)]
        return list(dict.fromkeys(names))

    @property
    def trained_modules(self) -> list[str]:
        """The modules this step trains: those its optimizers name (`params`, else the optimizer's
        name), then those its `unfreeze` lists (trained by the trainers' own means). Every other module
        is frozen in this step: nothing would update it, so its gradients would be computed for nothing
        (and the flow trainer would encode captions through an untrained text encoder)."""
        named = [m for n, o in self.optimization.optimizers.items() for m in (o.params or [n])]
        return list(dict.fromkeys([*named, *self.unfreeze]))


class Defaults(_Model):
    batch_size: PosInt = Field(None)  # type: ignore[assignment]
    workers: NonNegInt = Field(None)  # type: ignore[assignment]
    seed: Int = Field(None)  # type: ignore[assignment]


class ModelConfig(_Model):
    """One module of `models:`: `class` (`diffusers:X`, `transformers:X`, or `module:callable`) with
    `pretrained` (hub id or local folder, `from_pretrained`) or `config` (random init from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    class_: str = Field(
        alias="class",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="diffusers:X, transformers:X, module:fn",
    )
    pretrained: str | None = Field(None, description="hub id or local folder for from_pretrained")
    config: dict[str, Any] | None = Field(None, description="the class's config: random initialisation")
    subfolder: str | None = None
    revision: str | None = None
    local_files_only: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a module:fn")
    tokenizer: str | None = Field(None, description="a text encoder's tokenizer folder (default: beside it)")


class PipelineConfig(_Model):
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    default_dataset: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    steps: list[StepConfig] = Field(default_factory=list)
    modules: list[str] | None = Field(None, description="module names the run will have (for checks)")
    trainers: dict[str, list[str]] | None = Field(None, description="trainer name -> metrics it reports")
    models: dict[str, ModelConfig] | None = Field(
        None, description="modules built by `prep pipeline run` without --entry (prep.pipeline.models)"
    )
    trainer_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of the reference trainers (prep.pipeline.trainers)"
    )
    # where each key is, for errors raised after parsing (the orchestrator's, the plan's)
    source: str = Field("pipeline config", exclude=True)
    root: tuple[str, ...] = Field((), exclude=True)
    lines: dict[tuple[str, ...], int] = Field(default_factory=dict, exclude=True, repr=False)

    @property
    def module_names(self) -> list[str] | None:
        """The declared modules: `modules:`, else the keys of `models:`."""
        if self.modules is not None:
            return self.modules
        return list(self.models) if self.models is not None else None

    def step_dataset(self, index: int) -> str | None:
        step = self.steps[index]
        return step.dataset or self.default_dataset

    def place(self, path: Sequence[str]) -> str:
        """`file:line` of a key path below the pipeline section (the nearest key that has a line)."""
        return place_of(self.source, self.lines, (*self.root, *map(str, path)))

    def dotted(self, path: Sequence[str]) -> str:
        return ".".join((*self.root, *map(str, path)))


# ------------------------------------------------------------------------------------------- parsing
def place_of(where: str, lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f"{where}:{lines[path[:n]]}"
    return where


def error_doc(err: PrepError, source: str) -> dict[str, Any]:
    """An error of the config at `source` for machines (`validate --json`): its one line, what, where and
    fix, and the file, line and column it points at when it points into that file (`place_of`'s
    `file:line`, a YAML syntax error's `file:line:column`); a `--set` or another file's error has none."""
    m = re.fullmatch(rf"{re.escape(source)}(?::(\d+))?(?::(\d+))?", err.where or "")
    line, column = (int(g) if g else None for g in m.groups()) if m else (None, None)
    return {"message": err.line(), "what": err.what, "where": err.where, "fix": err.fix,
            "file": source if m else None, "line": line, "column": column}


def _keys_at(model: type[BaseModel], path: Sequence[str]) -> list[str]:
    """The keys the config accepts at `path` inside `model`: a did-you-mean suggests among them only (a
    step's key on a dataset is not answered 'did you mean' that same key)."""
    tp: Any = model
    for p in path:
        tp = _inner(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            if p not in fields:
                return []
            tp = fields[p].annotation
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]  # past the item's index or the entry's name
        else:
            return []
    tp = _inner(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return sorted(f.alias or n for n, f in tp.model_fields.items() if not f.exclude)
    return []


def _inner(tp: Any) -> Any:
    """Through `Annotated[...]` and `X | None` to the model, list or dict a key's value is."""
    while True:
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) is Annotated or (get_origin(tp) in (Union, UnionType) and len(args) == 1):
            tp = args[0]
        else:
            return tp


class _Collector:
    """Problems gathered across the whole config, each placed at `file:line` and named by key path."""

    def __init__(
        self,
        where: str,
        lines: Mapping[tuple[str, ...], int],
        root: tuple[str, ...],
        overridden: frozenset[tuple[str, ...]] = frozenset(),
    ) -> None:
        self.where, self.lines, self.root, self.overridden = where, lines, root, overridden
        self.errors: list[PrepError] = []

    def add(self, path: Sequence[str], what: str, fix: str) -> None:
        full = (*self.root, *map(str, path))
        key = ".".join(full) or "(top level)"
        by_set = any(full[:n] in self.overridden for n in range(1, len(full) + 1))
        place = "--set" if by_set else place_of(self.where, self.lines, full)
        self.errors.append(PrepError(f"{key}: {what}", place, fix))

    def pydantic(
        self, err: ValidationError, prefix: Sequence[str], data: Any, model: type[BaseModel]
    ) -> None:
        """pydantic's errors of `model` on `data` (the raw mapping below `prefix`), one per key: the
        members of a union (`image_size: int | [H, W]`) each report the same key, joined into one line."""
        joined: dict[tuple[str, ...], list[str]] = {}
        got: dict[tuple[str, ...], Any] = {}
        for e in err.errors():
            path = (*prefix, *_key_path(e["loc"], data, e["type"] == "missing"))
            if e["type"] == "extra_forbidden":
                known = _keys_at(model, path[len(prefix) : -1])
                close = difflib.get_close_matches(path[-1], known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.add(
                    path,
                    f"unknown key{hint}",
                    "remove it or fix its spelling (docs/pipeline.md lists every key)",
                )
            elif e["type"] == "missing":
                self.add(path, "required key is missing", "add it")
            elif e["msg"] not in joined.setdefault(path, []):
                joined[path].append(e["msg"])
                got.setdefault(path, e.get("input"))
        for path, msgs in joined.items():
            secret = any(_SECRET_KEY.search(p) for p in path)
            value = got[path]
            shown = "" if secret or isinstance(value, dict | list) else f" (got {value!r})"
            self.add(path, f"{'; or '.join(msgs)}{shown}", "correct the value")


def _key_path(loc: Sequence[Any], data: Any, missing: bool) -> list[str]:
    """The part of an error's location that names keys of the config: pydantic appends the union member
    it tried (`function-after[...]`, `constrained-float`, `list[...]`), which no user wrote. A missing
    key is the one element that is not in the data."""
    path: list[str] = []
    for i, p in enumerate(loc):
        in_list = isinstance(data, list) and isinstance(p, int) and 0 <= p < len(data)
        if (isinstance(data, dict) and p in data) or in_list:
            data = data[p]
        elif not (missing and i == len(loc) - 1):
            break
        path.append(str(p))
    return path


def _read(
    source: Any, overrides: Sequence[str]
) -> tuple[dict[str, Any], str, dict[tuple[str, ...], int], frozenset[tuple[str, ...]]]:
    if isinstance(source, Mapping):
        data: Any = _plain(source)
        where = "pipeline config"
        lines: dict[tuple[str, ...], int] = {}
    else:
        where = os.fspath(source)
        try:
            text = Path(source).read_text("utf-8")
        except FileNotFoundError:
            raise PrepError("pipeline config not found", where, "check the path") from None
        except (OSError, UnicodeDecodeError) as err:
            raise PrepError(
                f"cannot read the pipeline config ({err})", where, "pass a readable UTF-8 YAML file"
            ) from None
        data, lines = parse_yaml(text, where)
        if not isinstance(data, dict):
            raise PrepError(
                "the pipeline config must be a mapping", where, "start from `prep pipeline example`"
            )
    root, top = pipeline_root(data), set(data)
    overridden = frozenset(_outside_check(apply_override(data, a), a, root, top) for a in overrides)
    return interpolate(data, where, lines), where, lines, overridden


def _outside_check(
    path: tuple[str, ...], assignment: str, root: tuple[str, ...], top: set[str]
) -> tuple[str, ...]:
    """Refuse an override that names a pipeline key at the top of a file that holds the pipeline under
    `training.pipeline`: it would make a new top-level key that nothing reads."""
    keys = {n for n, f in PipelineConfig.model_fields.items() if not f.exclude}
    if root and path[0] not in top and path[0] in keys:
        key = ".".join(path)
        raise PrepError(
            f"the file holds the pipeline under {'.'.join(root)}; {key} would be a new top-level key that "
            "nothing reads",
            f"--set {key}",
            f"write --set {'.'.join(root)}.{assignment.strip()}",
        )
    return path


def _plain(value: Any) -> Any:
    """A caller's mapping as plain dicts and lists (the overrides and interpolation edit in place)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def pipeline_root(data: dict[str, Any]) -> tuple[str, ...]:
    """Where the pipeline section is: `training.pipeline` in a full training config, else the top."""
    training = data.get("training")
    if isinstance(training, dict) and isinstance(training.get("pipeline"), dict):
        return ("training", "pipeline")
    return ()


def parse_pipeline_config(
    source: Mapping[str, Any] | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    modules: Sequence[str] | None = None,
    trainers: Mapping[str, Sequence[str]] | None = None,
) -> PipelineConfig:
    """Parse and validate a pipeline: a YAML path, or a dict (a whole training config holding
    `training.pipeline`, or the pipeline section itself). `modules` / `trainers` (name -> metrics)
    declare what the run will have, for the checks that need them; the YAML may declare them too.
    Raises `PrepErrorGroup` with every problem, each naming its key path and line."""
    from prep.pipeline.checks import check_config

    data, where, lines, overridden = _read(source, overrides)
    root = pipeline_root(data)
    section = data["training"]["pipeline"] if root else data
    out = _Collector(where, lines, root, overridden)
    top = {k: v for k, v in section.items() if k not in ("datasets", "steps")}
    try:
        base = PipelineConfig.model_validate(top)
    except ValidationError as err:
        out.pydantic(err, (), top, PipelineConfig)
        base = None
    datasets: dict[str, Any] = {}
    raw_sets = section.get("datasets") or {}
    if not isinstance(raw_sets, dict):
        out.add(("datasets",), "must be a mapping of names to datasets", "write name: {type: ..., ...}")
        raw_sets = {}
    for name, raw in raw_sets.items():
        if not isinstance(raw, dict):
            out.add(("datasets", name), "must be a mapping with a type", "write {type: local, ...}")
            continue
        if "type" not in raw:
            out.add(("datasets", name), f"has no type (one of {', '.join(DATASET_TYPES)})", "add type: ...")
            continue
        model = DATASET_TYPES.get(raw["type"]) if isinstance(raw["type"], str) else None
        if model is None:  # looked up here, not a discriminated union: its field validators see `type` too
            out.add(("datasets", name, "type"), f"type must be one of {', '.join(DATASET_TYPES)}",
                    "set type to one of them")
            continue
        try:
            datasets[name] = model.model_validate(raw)
        except ValidationError as err:
            out.pydantic(err, ("datasets", name), raw, model)
    steps: list[StepConfig | None] = []
    raw_steps = section.get("steps")
    if raw_steps is None or raw_steps == []:
        out.add(("steps",), "the pipeline has no steps", "add at least one step under steps:")
        raw_steps = []
    elif not isinstance(raw_steps, list):
        out.add(("steps",), "must be a list of steps", "write steps: [- name: ..., ...]")
        raw_steps = []
    for i, raw in enumerate(raw_steps):
        try:
            steps.append(StepConfig.model_validate(raw))
        except ValidationError as err:
            out.pydantic(err, ("steps", str(i)), raw, StepConfig)
            steps.append(None)
    if base is not None:
        declared_modules = list(modules) if modules is not None else base.module_names
        declared_trainers = (
            {k: list(v) for k, v in trainers.items()} if trainers is not None else base.trainers
        )
        defined = [str(n) for n in raw_sets]
        for path, what, fix in check_config(
            base, datasets, steps, declared_modules, declared_trainers, defined
        ):
            out.add(path, what, fix)
    if out.errors:
        raise PrepErrorGroup(out.errors)
    assert base is not None  # a section that failed validation left an error above
    return base.model_copy(
        update={
            "datasets": datasets,
            "steps": steps,
            "source": where,
            "root": root,
            "lines": lines,
            "modules": list(modules) if modules is not None else base.module_names,
            "trainers": (
                {k: list(v) for k, v in trainers.items()} if trainers is not None else base.trainers
            ),
        }
    )
