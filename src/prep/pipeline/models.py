"""The `models:` section: each module by class and config (random init) or `pretrained` (a hub id or
local folder, `from_pretrained`), or a user's `module:callable`.

Loading is `prep.encoders.models.load_model`, the same code precache_encodings loads its encoders with
(one loader in prep). Randomly initialised modules are seeded from `defaults.seed` and their name, so a
module's initial weights do not depend on which other modules the YAML lists, and torch's global RNG is
left as it was.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from prep.errors import PrepError, PrepErrorGroup
from prep.pipeline.config import ModelConfig, PipelineConfig


def init_seed(seed: int | None, name: str) -> int:
    """The seed a randomly initialised module `name` gets (pure: seed and name only)."""
    digest = hashlib.sha256(f"{seed or 0}/models/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _where(cfg: PipelineConfig, name: str) -> str:
    return cfg.place(("models", name))


def build_model(cfg: PipelineConfig, name: str) -> torch.nn.Module:
    """Module `name` of `models:`."""
    from prep.encoders.models import load_model
    from prep.encoders.spec import model_kind

    spec: ModelConfig = cfg.models[name]  # type: ignore[index]
    if spec.pretrained is None and spec.config is None and model_kind(spec.class_) in ("vae", "hf_text"):
        raise PrepError(
            f"{cfg.dotted(('models', name))}: {spec.class_} needs `pretrained` or `config`",
            _where(cfg, name),
            "add pretrained: HUB_ID_OR_FOLDER, or config: {...} for random initialisation",
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(cfg.defaults.seed, name))
            model = load_model(
                spec.class_,
                spec.pretrained,
                config=spec.config,
                subfolder=spec.subfolder,
                revision=spec.revision,
                local_files_only=spec.local_files_only,
                options=spec.options,
            )
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PrepError(
            f"{cfg.dotted(('models', name))}: could not build {spec.class_} ({type(err).__name__}: {first})",
            _where(cfg, name),
            "check class, pretrained / config, subfolder and revision (run with --debug for the trace)",
        ) from err
    if not isinstance(model, torch.nn.Module):
        raise PrepError(
            f"{cfg.dotted(('models', name))}: {spec.class_} returned a {type(model).__name__}, not a module",
            _where(cfg, name),
            "return a torch.nn.Module",
        )
    return model


def build_models(cfg: PipelineConfig) -> dict[str, torch.nn.Module]:
    """Every module of `models:` (every failure reported at once)."""
    if not cfg.models:
        raise PrepError(
            "the pipeline has no models: section",
            cfg.place(()) if cfg.lines else cfg.source,
            "add models: {NAME: {class: ..., pretrained|config: ...}}, or pass --entry module:build",
        )
    out: dict[str, torch.nn.Module] = {}
    errors: list[PrepError] = []
    for name in cfg.models:
        try:
            out[name] = build_model(cfg, name)
        except PrepError as err:
            errors.append(err)
    if errors:
        raise PrepErrorGroup(errors)
    return out


def load_tokenizer_for(cfg: PipelineConfig, name: str) -> Any:
    """The tokenizer of text-encoder module `name`: `tokenizer:` if set, else beside the model in the
    diffusers layout (`text_encoder/` -> `tokenizer/`), found as precache_encodings finds it."""
    from prep.encoders.models import load_tokenizer, tokenizer_location
    from prep.encoders.spec import EncoderConfig

    spec: ModelConfig = cfg.models[name]  # type: ignore[index]
    if spec.pretrained is None and spec.tokenizer is None:
        raise PrepError(
            f"{cfg.dotted(('models', name))}: a randomly initialised text encoder has no tokenizer",
            _where(cfg, name),
            "set tokenizer: FOLDER (or precache the text embeddings)",
        )
    enc = EncoderConfig(
        key=name.replace("_", "-"),
        modality="text",
        model=spec.class_,
        pretrained=spec.pretrained or spec.tokenizer,
        subfolder=spec.subfolder,
        revision=spec.revision,
        local_files_only=spec.local_files_only,
        tokenizer=spec.tokenizer,
    )
    path, sub = tokenizer_location(enc)
    try:
        return load_tokenizer(path, sub, enc)
    except (OSError, ValueError) as err:
        raise PrepError(
            f"{cfg.dotted(('models', name))}: could not load its tokenizer from {path!r} ({err})",
            _where(cfg, name),
            "set tokenizer: FOLDER",
        ) from err
