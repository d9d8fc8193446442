"""A step's fingerprint: everything that decides what the step trains, as a JSON document and its hash.

Part of it: the data tree (each dataset's config with references expanded, tokens and worker counts
left out, plus the built loader's own fingerprint when there is one), the resolved batch size, the
length, trainers and their `trainer_options`, freeze/unfreeze sets, optimizers, schedulers, the transition
rule, validation, precision, accumulation, clipping and EMA. Not part of it: `workers`, `checkpoint_every`,
`sample_every`, `description` (they change no number the step computes), so a resume may change
them. A checkpoint stores each step's document; resuming into a step whose document changed is refused
with the keys that changed (`diff_fingerprints`), unless the caller allows it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prep.loaders.base import diff_fingerprints
from prep.pipeline.config import TRAINER_ALIASES, PipelineConfig, WebDatasetConfig, dataset_refs

_NOT_DECIDING = {"workers"}
_STEP_NOT_DECIDING = {"workers", "checkpoint_every", "sample_every", "description", "batch_size"}


def dataset_doc(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """The dataset's config as data, composites with their children inlined; no token, no workers."""
    from prep.formats.urls import redact_url

    ds = cfg.datasets[name]
    doc = ds.model_dump(mode="json", exclude={"webdataset_token", *_NOT_DECIDING}, exclude_none=True)
    if isinstance(ds, WebDatasetConfig):
        doc["webdataset_url"] = redact_url(ds.webdataset_url)
        doc["token"] = ds.webdataset_token is not None
    children = {ref: dataset_doc(cfg, ref) for _, ref in dataset_refs(ds)}
    if children:
        doc["children"] = children
    return {"name": name, **doc}


def step_doc(
    cfg: PipelineConfig,
    index: int,
    *,
    batch_sizes: dict[str, int] | None,
    loader: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint document of step `index` (`batch_sizes`: each batch-making dataset's resolved
    batch size; `loader` = the built tree's `fingerprint()`; both None when the data was not built)."""
    step = cfg.steps[index]
    exclude: dict[str, Any] = dict.fromkeys(_STEP_NOT_DECIDING | {"train", *TRAINER_ALIASES}, True)
    exclude["ema"] = {"use_for_samples"}  # which weights draw the samples changes no trained number
    doc = step.model_dump(mode="json", exclude=exclude)
    doc["trainers"] = step.trainers
    options = {t: cfg.trainer_options[t] for t in step.trainers if t in cfg.trainer_options}
    if options:  # they decide the loss (kl_weight, gan_weight...); left out when none, as before
        doc["trainer_options"] = options
    name = cfg.step_dataset(index)
    doc["dataset"] = dataset_doc(cfg, name) if name else None
    if step.validation is not None:
        doc["validation"]["dataset"] = dataset_doc(cfg, step.validation.dataset)
    doc["batch_size"] = batch_sizes
    if loader is not None:
        doc["loader"] = loader
    return doc


def doc_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changes(old: dict[str, Any], new: dict[str, Any], *, loader: bool = True) -> list[str]:
    """Human lines naming each key that differs between two step documents (`loader=False`: the
    config part only, for steps whose data is not built again)."""
    if not loader:
        old = {k: v for k, v in old.items() if k != "loader"}
        new = {k: v for k, v in new.items() if k != "loader"}
    return diff_fingerprints(old, new)
