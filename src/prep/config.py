"""The stage config: one YAML file for all six stages, with NeMo's key names.

Loading is: YAML (1.2 booleans only, so `resize_mode: no` stays the string "no") -> `--set a.b=c`
overrides -> `${...}` interpolation (config keys, NeMo's `${..stage.key}`, or environment variables)
-> pydantic validation. Every error names the file, line and key path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prep.errors import PrepError
from prep.stages import STAGE_ORDER, get_stage


class PrepErrorGroup(PrepError):
    """Several independent errors (all config problems at once); the CLI prints one line for each."""

    def __init__(self, errors: list[PrepError]) -> None:
        self.errors = errors
        super().__init__(errors[0].what, errors[0].where, errors[0].fix)

    def __reduce__(self):
        return (type(self), (self.errors,))


# ------------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: booleans are only true/false (never yes/no/on/off),
    `1e-4` is a float, `010` and `1:30` are not octal or sexagesimal numbers, dates stay strings."""


_YAML11_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in _YAML11_ONLY]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_constructor(  # YAML 1.2: `010` is ten, not octal eight
    "tag:yaml.org,2002:int",
    lambda loader, node: int(v, 16) if (v := loader.construct_scalar(node)).startswith("0x") else int(v, 10))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def parse_yaml(text: str, where: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML and map each key path to its 1-based line, for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PrepError(f"invalid YAML ({getattr(err, 'problem', err)})", f"{where}{line}",
                        "fix the YAML syntax at that line") from None
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node | None, path: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                p = (*path, str(k.value))
                if p in lines and k.value != "<<":  # YAML keeps the last silently; a config must not
                    raise PrepError(f"key {'.'.join(p)} is given twice (first at line {lines[p]})",
                                    f"{where}:{k.start_mark.line + 1}", "keep one of them")
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))

    walk(node, ())
    return data, lines


def parse_scalar(text: str) -> Any:
    """A `--set` value, typed as YAML would type it (YAML 1.2 booleans)."""
    try:
        return yaml.load(text, Loader=_Loader) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """Set `a.b=c` in `data` (the value typed as YAML); returns the key path it set."""
    if "=" not in assignment:
        raise PrepError(f"--set {assignment!r} has no '='", "command line", "write --set key.path=value")
    key, _, value = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise PrepError(f"--set {assignment!r} has an empty key", "command line",
                        "write --set key.path=value")
    node: Any = data
    for p in parts[:-1]:
        if isinstance(node, list):  # a list item by index: steps.0.n_epochs
            nxt = node[int(p)] if p.isdigit() and int(p) < len(node) else None
            if nxt is None:
                raise PrepError(f"--set {key}: the list has no item {p}", "command line",
                                f"use an index below {len(node)}")
        else:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
        if not isinstance(nxt, dict | list):
            raise PrepError(f"--set {key}: {p!r} is a value, not a section", "command line",
                            "set the value itself, not a key below it")
        node = nxt
    if isinstance(node, list):
        if not (parts[-1].isdigit() and int(parts[-1]) < len(node)):
            raise PrepError(f"--set {key}: the list has no item {parts[-1]}", "command line",
                            f"use an index below {len(node)}")
        node[int(parts[-1])] = parse_scalar(value)
    else:
        node[parts[-1]] = parse_scalar(value)
    return tuple(parts)


# ----------------------------------------------------------------------------------------- interpolation

_REF_RE = re.compile(r"\$\{([^${}]+)\}")


def _lookup(data: Any, parts: list[str]) -> tuple[bool, Any]:
    node: Any = data
    for p in parts:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            return False, None
    return True, node


def _target(ref: str, path: str) -> list[str] | None:
    """The key path a reference names: absolute (`a.b`), or OmegaConf-relative to the key at `path`
    (`${.x}` a sibling, `${..s.x}` one level up, as NeMo's templates write it). None if it climbs too far."""
    dots = len(ref) - len(ref.lstrip("."))
    rest = [p for p in ref[dots:].split(".") if p]
    if dots == 0:
        return rest
    base = path.split(".")[:-1] if path else []
    up = dots - 1
    if up > len(base):
        return None
    return base[: len(base) - up] + rest


def interpolate(data: dict[str, Any], where: str,
                lines: dict[tuple[str, ...], int] | None = None) -> dict[str, Any]:
    """Resolve `${key.path}`, relative `${.key}`/`${..section.key}` (NeMo's form), `${env:VAR}`,
    `${oc.env:VAR,default}` and `${VAR}` (a config key first, else an environment variable).
    Errors name the file, the line (from `lines`) and the key that holds the reference."""

    def place(path: str) -> str:
        line = (lines or {}).get(tuple(path.split(".")))
        return f"{where}:{line}" if line else where

    def resolve_ref(ref: str, path: str, stack: tuple[str, ...]) -> Any:
        ref = ref.strip()
        for prefix in ("oc.env:", "env:"):
            if ref.startswith(prefix):
                name, _, default = ref[len(prefix):].partition(",")
                name = name.strip()
                if name in os.environ:
                    return os.environ[name]
                if default:
                    return default.strip()
                raise PrepError(f"{path}: ${{{ref}}}: environment variable {name} is not set", place(path),
                                f"export {name}=... or set the key directly")
        target = _target(ref, path)
        found, value = _lookup(data, target) if target else (False, None)
        if found:
            dotted = ".".join(target or [])
            if dotted in stack or dotted == path:
                chain = " -> ".join((*stack, dotted)) if dotted in stack else f"{path} -> {dotted}"
                raise PrepError(f"{path}: ${{{ref}}} refers to itself (cycle {chain})", place(path),
                                "break the cycle")
            return resolve(value, dotted, (*stack, dotted))
        if not ref.startswith(".") and ref in os.environ:
            return os.environ[ref]
        raise PrepError(f"{path}: ${{{ref}}} is neither a config key nor an environment variable",
                        place(path),
                        "define the key, export the variable, or write the value directly")

    def resolve(value: Any, path: str, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{path}.{k}" if path else k, stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{path}.{i}", stack) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            whole = _REF_RE.fullmatch(value)
            if whole:
                return resolve_ref(whole.group(1), path, stack)
            return _REF_RE.sub(lambda m: str(resolve_ref(m.group(1), path, stack)), value)
        return value

    return resolve(data, "", ())


# ------------------------------------------------------------------------------------------------ models


def _stage_field(name: str):
    cls = get_stage(name).Config
    return (cls, Field(default_factory=cls, description=f"the {name} stage"))


class _RootBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    dataset_repo_id: str | None = Field(None, description="HuggingFace dataset repo, e.g. laion/laion-art")
    dataset_output_root: Path | None = Field(None, description="folder under which every stage writes")

    def root_dir(self, what: str) -> Path:
        if self.dataset_output_root is None:
            raise PrepError(f"{what} is not set and dataset_output_root is not set either", "config",
                            f"set {what} or dataset_output_root")
        return self.dataset_output_root

    @model_validator(mode="after")
    def _chain_dirs(self):
        """Fill unset folders the way NeMo's template chains them: each stage reads the last one's output."""
        root = self.dataset_output_root

        def under(name: str) -> Path | None:
            return root / name if root is not None else None

        dp, di, rt = self.download_parquet, self.download_images, self.reorganize_tar  # type: ignore[attr-defined]
        pc, ms, gw = self.precache_encodings, self.merge_source_tar, self.generate_wdinfo  # type: ignore[attr-defined]
        dp.output_dir = dp.output_dir or under("parquet")
        di.input_dir = di.input_dir or dp.output_dir
        di.output_dir = di.output_dir or under("tarfiles_raw")
        rt.input_dir = rt.input_dir or di.output_dir
        rt.output_dir = rt.output_dir or under("tarfiles_reorganized")
        pc.input_dir = pc.input_dir or rt.output_dir
        pc.output_dir = pc.output_dir or under("tarfiles_precached")
        ms.input_dir = ms.input_dir or pc.output_dir
        ms.source_dir = ms.source_dir or rt.output_dir
        if not gw.input_dir:
            if ms.enable:
                last = ms.output_dir or ms.input_dir
            else:
                last = pc.output_dir if pc.enable else rt.output_dir
            gw.input_dir = [last] if last is not None else []
        return self


def _make_root_model() -> type[BaseModel]:
    from pydantic import create_model

    fields = {name: _stage_field(name) for name in STAGE_ORDER}
    return create_model("PrepConfig", __base__=_RootBase, **fields)  # type: ignore[call-overload]


_ROOT_MODEL: type[BaseModel] | None = None


def root_model() -> type[BaseModel]:
    global _ROOT_MODEL
    if _ROOT_MODEL is None:
        _ROOT_MODEL = _make_root_model()
    return _ROOT_MODEL


_SECRET_KEY = re.compile(r"token|secret|password|credential", re.IGNORECASE)


def _validation_errors(err: ValidationError, where: str, lines: dict[tuple[str, ...], int],
                       overridden: frozenset[tuple[str, ...]] = frozenset()) -> PrepErrorGroup:
    """One PrepError per problem, placed at `file:line`, or at `--set KEY` when the value came from there."""
    out: list[PrepError] = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        place = where
        for n in range(len(loc), 0, -1):
            if loc[:n] in overridden:
                place = "--set"
                break
            if loc[:n] in lines:
                place = f"{where}:{lines[loc[:n]]}"
                break
        if e["type"] == "extra_forbidden":
            what = f"unknown key {key}"
            fix = "remove it or check its spelling (`prep keys STAGE` lists every key)"
        elif e["type"] == "missing":
            what, fix = f"required key {key} is missing", "add it to the config or pass --set"
        else:
            got = e.get("input")
            shown = "***" if _SECRET_KEY.search(key) else repr(got)  # never echo a token in an error
            what = f"{key}: {e['msg']} (got {shown})" if not isinstance(got, dict) else f"{key}: {e['msg']}"
            fix = "correct the value"
        out.append(PrepError(what, place, fix))
    return PrepErrorGroup(out)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Any:
    """Load, override, interpolate and validate a stage config. `path=None` starts from defaults."""
    where = str(path) if path is not None else "config"
    data: Any = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        try:
            text = Path(path).read_text("utf-8")
        except FileNotFoundError:
            raise PrepError("config file not found", where, "check the --config path") from None
        except (OSError, UnicodeDecodeError) as err:
            raise PrepError(f"cannot read the config ({err})", where,
                            "pass a readable UTF-8 YAML file") from None
        data, lines = parse_yaml(text, where)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PrepError("config must be a mapping of keys to values", where,
                            "start from configs/download_multimodal.yaml")
    overridden = frozenset(apply_override(data, assignment) for assignment in overrides or [])
    data = interpolate(data, where, lines)
    try:
        return root_model().model_validate(data)
    except ValidationError as err:
        raise _validation_errors(err, where, lines, overridden) from None
