"""Check the whole encoder list before any shard is read: keys and output members unique, classes
import, local folders exist with a config, hub ids well formed, and cached (with local_files_only, or
when the hub cannot be reached). Every problem is reported at once, each naming the encoder."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from prep.encoders.spec import EncoderConfig
from prep.errors import PrepError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")
LIBRARY_EXTRA = {"diffusers": "prep[encoders]", "transformers": "prep[encoders]"}


def _where(i: int, cfg: EncoderConfig) -> str:
    return f"precache_encodings.encoders[{i}] (key {cfg.key})"


def _looks_local(ref: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, C:\\x) is a folder."""
    return (
        ref.startswith((".", "/", "~"))
        or ref.count("/") > 1
        or "\\" in ref
        or Path(ref).expanduser().exists()
    )


def _check_location(
    ref: str,
    sub: str | None,
    files: tuple[str, ...],
    cfg: EncoderConfig,
    what: str,
    where: str,
    unreachable: Callable[[], str | None],
) -> list[PrepError]:
    if _looks_local(ref):
        folder = Path(ref).expanduser() / (sub or "")
        if not folder.is_dir():
            return [
                PrepError(
                    f"{what} folder {folder} does not exist",
                    where,
                    f"set {'pretrained' if what == 'model' else 'tokenizer'} to an existing folder or a "
                    "hub id (org/name)",
                )
            ]
        if not any((folder / f).exists() for f in files):
            return [
                PrepError(
                    f"{what} folder {folder} holds none of {', '.join(files)}",
                    where,
                    "point it at a folder written by save_pretrained (check subfolder)",
                )
            ]
        return []
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError as err:
        return [
            PrepError(
                f"{what} {ref!r} is neither a folder nor a valid hub id ({err})",
                where,
                "use org/name or an existing folder",
            )
        ]
    from huggingface_hub import try_to_load_from_cache

    filename = f"{sub}/{files[0]}" if sub else files[0]
    found = [try_to_load_from_cache(ref, f"{sub}/{f}" if sub else f, revision=cfg.revision) for f in files]
    if any(isinstance(p, str) for p in found):
        return []
    if cfg.local_files_only:
        return [
            PrepError(
                f"{what} {ref!r} is not in the local hub cache ({filename})",
                where,
                "download it once (huggingface-cli download) or set local_files_only: false",
            )
        ]
    reason = unreachable()  # else every task would spend the client's retries, then fail alike
    if reason is not None:
        return [
            PrepError(
                f"{what} {ref!r} is not in the local hub cache and {reason}",
                where,
                "check the network and HF_ENDPOINT, or download it once where the hub is reachable "
                "(huggingface-cli download) into this HF_HOME",
            )
        ]
    return []


def _check_import(i: int, cfg: EncoderConfig) -> list[PrepError]:
    where = _where(i, cfg)
    if cfg.kind == "open_clip":
        if importlib.util.find_spec("open_clip") is None:
            return [
                PrepError(
                    "open_clip is not installed", where, "pip install 'prep[open_clip]' (open-clip-torch)"
                )
            ]
        return []
    module, _, name = cfg.model.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        extra = LIBRARY_EXTRA.get(module)
        fix = f"pip install '{extra}'" if extra else f"make {module} importable (PYTHONPATH or pip install)"
        return [PrepError(f"cannot import {module} ({err})", where, fix)]
    obj = getattr(mod, name, None)
    if obj is None:
        return [PrepError(f"{module} has no {name}", where, "check the spelling of model")]
    if not callable(obj):
        return [PrepError(f"{cfg.model} is not callable", where, "name a class or a factory function")]
    if cfg.kind in ("vae", "hf_text") and not hasattr(obj, "from_pretrained"):
        return [PrepError(f"{cfg.model} has no from_pretrained", where, "name a model class")]
    return []


def validate_encoders(encoders: list[EncoderConfig]) -> None:
    """Raise one PrepError per problem (grouped), or return when the list can run."""
    from prep.errors import PrepErrorGroup

    problems: list[PrepError] = []
    if not encoders:
        raise PrepError(
            "no encoders configured",
            "precache_encodings.encoders",
            "add at least one encoder (see configs/download_multimodal.yaml)",
        )
    keys = Counter(e.key for e in encoders)
    for key, n in keys.items():
        if n > 1:
            problems.append(
                PrepError(
                    f"encoder key {key!r} is used {n} times",
                    "precache_encodings.encoders",
                    "give every encoder its own key",
                )
            )
    fields = Counter(f for e in encoders for f in e.field_names())
    for f, n in fields.items():
        if n > 1 and max(keys.values()) == 1:
            problems.append(
                PrepError(
                    f"two encoders write member .{f}",
                    "precache_encodings.encoders",
                    "rename a key (KEY_mask and KEY_pooled are taken by text encoders)",
                )
            )
    from prep.hub import unreachable_reason

    unreachable = functools.cache(unreachable_reason)  # one connect for the whole list, and only if needed
    for i, cfg in enumerate(encoders):
        where = _where(i, cfg)
        found = _check_import(i, cfg)
        problems += found
        if cfg.kind in ("vae", "hf_text") and cfg.pretrained:
            problems += _check_location(
                cfg.pretrained, cfg.subfolder, MODEL_FILES, cfg, "model", where, unreachable
            )
        if cfg.kind == "hf_text" and not found:
            from prep.encoders.models import tokenizer_location

            ref, sub = tokenizer_location(cfg)
            problems += _check_location(ref, sub, TOKENIZER_FILES, cfg, "tokenizer", where, unreachable)
    if problems:
        raise PrepErrorGroup(problems)
