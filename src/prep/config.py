"""The stage config: one YAML file for every stage, with NeMo's key names.

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
from pydantic import ConfigDict, Field, ValidationError, model_validator

import prep.stages.download_images
import prep.stages.download_parquet
import prep.stages.generate_wdinfo
import prep.stages.ingest_local
import prep.stages.merge_source_tar
import prep.stages.precache_encodings
import prep.stages.reorganize_tar
from prep.errors import PrepError, PrepErrorGroup
from prep.models import ConfigModel

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


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.2 integers: `010` is ten, not octal eight."""
    text = str(loader.construct_scalar(node))
    return int(text, 16) if text.startswith("0x") else int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


_MAX_VALUES = 100_000  # keys and items of a config, aliases expanded: far beyond any real one


def parse_yaml(text: str, where: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML and map each key path to its 1-based line, for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f":{mark.line + 1}:{mark.column + 1}" if mark else ""  # file:line:column, as compilers say
        raise PrepError(f"invalid YAML ({getattr(err, 'problem', err)})", f"{where}{place}",
                        "fix the YAML syntax at that line") from None
    lines: dict[tuple[str, ...], int] = {}
    seen = [0]

    def walk(n: yaml.Node | None, path: tuple[str, ...]) -> None:
        seen[0] += 1  # the tree as aliases expand it: a few aliases deep can make it astronomically large
        if seen[0] > _MAX_VALUES:
            raise PrepError(f"the YAML expands to more than {_MAX_VALUES:,} values (aliases that repeat "
                            "aliases?)", where, "write the config without nested aliases")
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                p = (*path, str(k.value))
                if p in lines and k.value != "<<":  # YAML keeps the last silently; a config must not
                    raise PrepError(f"key {'.'.join(p)} is given twice (first at line {lines[p]})",
                                    f"{where}:{k.start_mark.line + 1}:{k.start_mark.column + 1}",
                                    "keep one of them")
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
        raise PrepError(f"{assignment!r} has no '='", "--set", "write --set key.path=value")
    key, _, value = assignment.partition("=")
    key = key.strip()
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise PrepError(f"{assignment!r} has an empty key", "--set", "write --set key.path=value")
    node: Any = data
    for p in parts[:-1]:
        if isinstance(node, list):  # a list item by index: steps.0.n_epochs
            nxt = node[int(p)] if p.isdigit() and int(p) < len(node) else None
            if nxt is None:
                raise PrepError(f"the list has no item {p}", f"--set {key}",
                                f"use an index below {len(node)}")
        else:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
        if not isinstance(nxt, dict | list):
            raise PrepError(f"{p!r} is a value, not a section", f"--set {key}",
                            "set the value itself, not a key below it")
        node = nxt
    if isinstance(node, list):
        if not (parts[-1].isdigit() and int(parts[-1]) < len(node)):
            raise PrepError(f"the list has no item {parts[-1]}", f"--set {key}",
                            f"use an index below {len(node)}")
        node[int(parts[-1])] = parse_scalar(value)
    else:
        node[parts[-1]] = parse_scalar(value)
    return tuple(parts)


Overrides = dict[tuple[str, ...], str]  # key path set by --set -> the key as typed


def origin(loc: tuple[str, ...], where: str, lines: dict[tuple[str, ...], int], overrides: Overrides) -> str:
    """Where the value at key path `loc` came from, for an error about it: `--set KEY` when an override
    set it or a section above it (overrides replace what the file says), or shares more of its path than
    anything the file sets (a section given only by --set); else `file:line` of the deepest key on the
    path that the file sets."""
    file_depth = next((n for n in range(len(loc), 0, -1) if loc[:n] in lines), 0)

    def shared(parts: tuple[str, ...]) -> int:
        return next((n for n in range(min(len(parts), len(loc)), 0, -1) if parts[:n] == loc[:n]), 0)

    # the most specific override that set the key or a section above it; else the one nearest to it
    setting = [(len(parts), typed) for parts, typed in overrides.items() if shared(parts) == len(parts)]
    if setting:
        return f"--set {max(setting)[1]}"
    near = max(((shared(parts), typed) for parts, typed in overrides.items()), default=(0, ""))
    if near[0] > file_depth:
        return f"--set {near[1]}"
    return f"{where}:{lines[loc[:file_depth]]}" if file_depth else where


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


class _MissingRef(PrepError):
    """A `${...}` naming a key the config does not hold (it may still have a computed default)."""


def interpolate(data: dict[str, Any], where: str, lines: dict[tuple[str, ...], int] | None = None,
                overrides: Overrides | None = None, computed: dict[str, Any] | None = None, *,
                drop_missing: bool = False) -> dict[str, Any]:
    """Resolve `${key.path}`, relative `${.key}`/`${..section.key}` (NeMo's form), `${env:VAR}`,
    `${oc.env:VAR,default}` and `${VAR}` (a config key first, else an environment variable).
    A key the config leaves unset is looked up in `computed` (the validated defaults); with
    `drop_missing`, a value that still names a missing key is left out instead of failing.
    Errors name the key that holds the reference and where it was set (file and line from `lines`, or
    the `--set` of `overrides`)."""

    def place(path: str) -> str:
        return origin(tuple(path.split(".")), where, lines or {}, overrides or {})

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
        found, value = _lookup(computed, target) if target and computed is not None else (False, None)
        if found and value is not None:
            return value
        raise _MissingRef(f"{path}: ${{{ref}}} is neither a config key nor an environment variable",
                          place(path),
                          "define the key, export the variable, or write the value directly")

    def resolve(value: Any, path: str, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                try:
                    out[k] = resolve(v, f"{path}.{k}" if path else k, stack)
                except _MissingRef:
                    if not drop_missing:
                        raise
            return out
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


def _section(stage: Any) -> Any:
    return Field(default_factory=stage.Config, description=f"the {stage.NAME} stage")


class PrepConfig(ConfigModel):
    """The whole stage config: the shared keys and one section per stage (in `STAGE_ORDER`)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    dataset_repo_id: str | None = Field(None, description="HuggingFace dataset repo, e.g. laion/laion-art")
    dataset_output_root: Path | None = Field(None, description="folder under which every stage writes")
    download_parquet: prep.stages.download_parquet.Config = _section(prep.stages.download_parquet)
    download_images: prep.stages.download_images.Config = _section(prep.stages.download_images)
    ingest_local: prep.stages.ingest_local.Config = _section(prep.stages.ingest_local)
    reorganize_tar: prep.stages.reorganize_tar.Config = _section(prep.stages.reorganize_tar)
    precache_encodings: prep.stages.precache_encodings.Config = _section(prep.stages.precache_encodings)
    merge_source_tar: prep.stages.merge_source_tar.Config = _section(prep.stages.merge_source_tar)
    generate_wdinfo: prep.stages.generate_wdinfo.Config = _section(prep.stages.generate_wdinfo)

    def root_dir(self, what: str) -> Path:
        if self.dataset_output_root is None:
            raise PrepError(f"{what} is not set and dataset_output_root is not set either", "config",
                            f"set {what} or dataset_output_root")
        return self.dataset_output_root

    @model_validator(mode="after")
    def _chain_dirs(self):
        """Fill unset folders the way NeMo's template chains them, each stage reading the output of the
        last ENABLED stage before it that writes shards (download_images or ingest_local, reorganize_tar,
        precache_encodings, merge_source_tar); with none enabled, NeMo's fixed chain. merge_source_tar's
        unset `enable` follows precache: it runs exactly when precache writes encodings apart."""
        root = self.dataset_output_root

        def under(name: str) -> Path | None:
            return root / name if root is not None else None

        dp, di, il = self.download_parquet, self.download_images, self.ingest_local
        rt, pc = self.reorganize_tar, self.precache_encodings
        ms, gw = self.merge_source_tar, self.generate_wdinfo
        if ms.enable is None:
            ms.enable = pc.enable and not pc.keep_source
        dp.output_dir = dp.output_dir or under("parquet")
        di.input_dir = di.input_dir or dp.output_dir
        di.output_dir = di.output_dir or under("tarfiles_raw")
        il.output_dir = il.output_dir or under("tarfiles_ingested")
        rt.output_dir = rt.output_dir or under("tarfiles_reorganized")
        pc.output_dir = pc.output_dir or under("tarfiles_precached")
        writers: list[tuple[Any, Path | None]] = [
            (di, di.output_dir), (il, il.output_dir), (rt, rt.output_dir), (pc, pc.output_dir),
            (ms, ms.output_dir or ms.input_dir or pc.output_dir)]

        def last_enabled(before: Any, fallback: Path | None) -> Path | None:
            upto = writers[: next(i for i, (s, _) in enumerate(writers) if s is before)]
            return next((out for s, out in reversed(upto) if s.enable), fallback)

        rt.input_dir = rt.input_dir or last_enabled(rt, di.output_dir)
        pc.input_dir = pc.input_dir or last_enabled(pc, rt.output_dir)
        ms.input_dir = ms.input_dir or pc.output_dir
        ms.source_dir = ms.source_dir or pc.input_dir  # the shards precache read: their members
        if not gw.input_dir:
            writer, last = next(((s, out) for s, out in reversed(writers) if s.enable), (rt, rt.output_dir))
            gw.input_dir = [last] if last is not None else []
            if gw.tar_chunk_size is None and writer in (rt, pc, ms):  # shards reorganize_tar cut
                gw.tar_chunk_size = rt.tar_chunk_size
        return self


_SECRET_KEY = re.compile(r"token|secret|password|credential", re.IGNORECASE)


def _validation_errors(err: ValidationError, where: str, lines: dict[tuple[str, ...], int],
                       overrides: Overrides | None = None) -> PrepErrorGroup:
    """One PrepError per problem, placed at `file:line`, or at `--set KEY` when the value came from there."""
    out: list[PrepError] = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        place = origin(loc, where, lines, overrides or {})
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


COMPUTED_ROUNDS = 4  # a reference to a computed default that itself follows a reference, and so on


def interpolate_with_defaults(data: dict[str, Any], where: str, lines: dict[tuple[str, ...], int],
                              overrides: Overrides | None = None) -> dict[str, Any]:
    """`interpolate`, where a reference may name a key left to its computed default (the template's
    `${..reorganize_tar.output_dir}` with output_dir unset): the defaults are computed from the values
    that do resolve, then the references are resolved again, until the defaults stop changing."""
    try:
        return interpolate(data, where, lines, overrides)
    except _MissingRef as err:
        missing = err
    computed: dict[str, Any] | None = None
    for _ in range(COMPUTED_ROUNDS):
        partial = interpolate(data, where, lines, overrides, computed, drop_missing=True)
        try:
            fresh = PrepConfig.model_validate(partial).model_dump(mode="json")
        except ValidationError:
            raise missing from None
        if fresh == computed:
            break
        computed = fresh
    return interpolate(data, where, lines, overrides, computed)


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
    typed = {apply_override(data, a): a.partition("=")[0].strip() for a in overrides or []}
    data = interpolate_with_defaults(data, where, lines, typed)
    try:
        return PrepConfig.model_validate(data)
    except ValidationError as err:
        raise _validation_errors(err, where, lines, typed) from None
