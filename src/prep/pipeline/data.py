"""Pipeline datasets -> the `prep.loaders` tree the same code would build by hand.

Only the public loaders API is used (ShardDataset, LocalDataset, BlendDataset, MixBatchDataset,
ConcatDataset, EpochizeDataset, DataLoader, resolve_chunk_config), and a key that is unset in the YAML
is not passed at all, so the loader's own default applies exactly as it would in Python: the YAML adds
nothing the API cannot do and hides nothing it does.

Inheritance: `batch_size` follows `prep.pipeline.resolve` (step > nearest dataset > defaults > args >
built-in); `seed`, `shuffle`, `decode`, `image_size`, `transform`, `drop_last` set on a blend, mix or
concat fill the datasets below it that do not set them (nearest wins; `seed` then falls back to
`defaults.seed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.errors import PrepError
from prep.loaders.base import sum_of_sizes
from prep.pipeline.checks import import_callable
from prep.pipeline.config import (
    BlendDatasetConfig,
    ConcatDatasetConfig,
    DatasetConfig,
    LocalDatasetConfig,
    MixDatasetConfig,
    PipelineConfig,
    PrepDatasetConfig,
    StepConfig,
    WebDatasetConfig,
    dataset_refs,
)
from prep.pipeline.resolve import Resolved, resolve_setting

_INHERITED = ("shuffle", "decode", "image_size", "transform", "drop_last")


@dataclass
class Built:
    """A built (sub)tree: the node, a one-line description, and its sizes per epoch (None: endless or
    unknown). `batch_size` is the per-rank batch of a leaf or mix (None for blends/concats, whose
    sources keep their own); `batch_sizes` lists every batch-making dataset below with its own."""

    node: Any
    description: str
    samples_per_epoch: int | None
    batches_per_epoch: int | None
    batch_size: Resolved | None
    batch_sizes: list[tuple[str, Resolved]] = field(default_factory=list)


def _nearest(chain: list[tuple[str, DatasetConfig]], key: str) -> Any:
    for _, ds in reversed(chain):
        value = getattr(ds, key)
        if value is not None:
            return value
    return None


def resolve_batch_size(
    cfg: PipelineConfig,
    chain: list[tuple[str, DatasetConfig]],
    step: StepConfig | None,
    args: Mapping[str, int | None] | None,
    step_value: int | None = None,
) -> Resolved:
    return resolve_setting(
        "batch_size",
        step=step_value if step_value is not None else (step.batch_size if step is not None else None),
        datasets=[(n, d.batch_size) for n, d in reversed(chain)],
        defaults=cfg.defaults.batch_size,
        args=args,
    )


def resolve_batch_sizes(cfg: PipelineConfig, name: str, *, step: StepConfig | None = None,
                        args: Mapping[str, int | None] | None = None, batch_size: int | None = None,
                        _chain: tuple[tuple[str, DatasetConfig], ...] = ()) -> list[tuple[str, Resolved]]:
    """Each batch-making dataset under `name` (leaves, and mixes, which batch their sources' samples)
    with its resolved per-rank batch size, without opening any data (the same rule `build_dataset`
    applies)."""
    ds = cfg.datasets[name]
    chain = [*_chain, (name, ds)]
    if ds.type in ("blend", "concat"):
        return [x for _, ref in dataset_refs(ds)
                for x in resolve_batch_sizes(cfg, ref, step=step, args=args, batch_size=batch_size,
                                             _chain=tuple(chain))]
    return [(name, resolve_batch_size(cfg, chain, step, args, batch_size))]


def resolve_workers(
    cfg: PipelineConfig, dataset: str, step: StepConfig | None, args: Mapping[str, int | None] | None
) -> Resolved:
    return resolve_setting(
        "workers",
        step=step.workers if step is not None else None,
        datasets=[(dataset, cfg.datasets[dataset].workers)],
        defaults=cfg.defaults.workers,
        args=args,
    )


def _leaf_kwargs(
    cfg: PipelineConfig,
    chain: list[tuple[str, DatasetConfig]],
    bs: Resolved,
    rank: int | None,
    world_size: int | None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": bs.value}
    seed = _nearest(chain, "seed")
    seed = seed if seed is not None else cfg.defaults.seed
    if seed is not None:
        kwargs["seed"] = seed
    for key in _INHERITED:
        value = _nearest(chain, key)
        if value is None:
            continue
        if key == "transform":
            value = import_callable(value)
        elif key == "image_size" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    return kwargs


def _composite_seed(cfg: PipelineConfig, chain: list[tuple[str, DatasetConfig]]) -> dict[str, Any]:
    seed = _nearest(chain, "seed")
    seed = seed if seed is not None else cfg.defaults.seed
    return {} if seed is None else {"seed": seed}


def build_dataset(
    cfg: PipelineConfig,
    name: str,
    *,
    step: StepConfig | None = None,
    args: Mapping[str, int | None] | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Built:
    """Build dataset `name` for `step` (its batch size overrides every leaf's). `batch_size` overrides
    as a step would (validation loaders). `rank`/`world_size` default to torch.distributed / env."""
    return _build(cfg, name, [], step, args, batch_size, rank, world_size)


def _build(
    cfg: PipelineConfig,
    name: str,
    chain: list[tuple[str, DatasetConfig]],
    step: StepConfig | None,
    args: Mapping[str, int | None] | None,
    step_bs: int | None,
    rank: int | None,
    world_size: int | None,
) -> Built:
    from prep.formats.urls import redact_url
    from prep.loaders import (
        BlendDataset,
        ConcatDataset,
        EpochizeDataset,
        LocalDataset,
        MixBatchDataset,
        ShardDataset,
        Source,
    )

    ds = cfg.datasets[name]
    chain = [*chain, (name, ds)]
    where = cfg.place(("datasets", name))
    built: Built
    try:
        if isinstance(ds, LocalDatasetConfig | WebDatasetConfig | PrepDatasetConfig):
            bs = resolve_batch_size(cfg, chain, step, args, step_bs)
            kwargs = _leaf_kwargs(cfg, chain, bs, rank, world_size)
            leaf: LocalDataset | ShardDataset
            if isinstance(ds, LocalDatasetConfig):
                leaf = LocalDataset(ds.image_folder, ds.captions_file, **kwargs)
                desc = f"local {ds.image_folder}: {leaf.total:,} images"
            elif isinstance(ds, PrepDatasetConfig):
                path = Path(ds.path)
                if ds.fields is not None:
                    kwargs["fields"] = ds.fields
                leaf = ShardDataset(path.parent if path.name == "manifest.json" else path, **kwargs)
                desc = f"prep {ds.path}: {len(leaf.shards)} shards, {leaf.total:,} samples"
            else:
                fields = [ds.webdataset_image_key, ds.webdataset_caption_key]
                if "webdataset_label_key" in ds.model_fields_set:
                    fields.append(ds.webdataset_label_key)
                token = ds.webdataset_token.get_secret_value() if ds.webdataset_token is not None else None
                leaf = ShardDataset(
                    ds.webdataset_url, fields=fields, token=token, allow_pipe=ds.allow_pipe, **kwargs
                )
                url = redact_url(ds.webdataset_url)
                desc = f"webdataset {url}: {len(leaf.shards)} shards, {leaf.total:,} samples"
            built = Built(leaf, desc, leaf.total, leaf.batches_per_epoch(), bs, [(name, bs)])
        elif isinstance(ds, BlendDatasetConfig | MixDatasetConfig):
            parts = [_build(cfg, s.dataset, chain, step, args, step_bs, rank, world_size) for s in ds.sources]
            sources = [
                Source(p.node, s.weight, name=s.dataset, sample_weight=s.sample_weight)
                for p, s in zip(parts, ds.sources, strict=True)
            ]
            kwargs = _composite_seed(cfg, chain)
            total = sum(s.weight for s in ds.sources)
            shares = "".join(
                f"\n  {s.weight / total:.2g} × " + p.description.replace("\n", "\n  ")
                for s, p in zip(ds.sources, parts, strict=True)
            )
            bs = None
            node: BlendDataset | MixBatchDataset
            if isinstance(ds, BlendDatasetConfig):
                kwargs.update(
                    {k: getattr(ds, k) for k in ("schedule", "repeat") if getattr(ds, k) is not None}
                )
                node = BlendDataset(*sources, **kwargs)
                desc = f"blend{' ' + ds.schedule if ds.schedule else ''} of whole batches:{shares}"
            else:
                bs = resolve_batch_size(cfg, chain, step, args, step_bs)
                kwargs.update({k: getattr(ds, k) for k in ("counts", "repeat") if getattr(ds, k) is not None})
                if world_size is not None:
                    kwargs["world_size"] = world_size
                node = MixBatchDataset(*sources, batch_size=bs.value, **kwargs)
                desc = f"mix{' ' + ds.counts if ds.counts else ''} inside each batch of {bs.value}:{shares}"
            endless = isinstance(ds, MixDatasetConfig) or ds.repeat
            sizes = [p.samples_per_epoch for p in parts]
            samples = None if endless else sum_of_sizes(sizes)
            built = Built(
                node,
                desc,
                samples,
                node.batches_per_epoch(),
                bs,
                [(name, bs)] if bs else [b for p in parts for b in p.batch_sizes],
            )
        else:
            assert isinstance(ds, ConcatDatasetConfig)
            parts = [_build(cfg, n, chain, step, args, step_bs, rank, world_size) for n in ds.datasets]
            concat = ConcatDataset(*[p.node for p in parts])
            built = Built(
                concat,
                "concat:" + "".join("\n  " + p.description.replace("\n", "\n  ") for p in parts),
                sum_of_sizes([p.samples_per_epoch for p in parts]),
                concat.batches_per_epoch(),
                None,
                [b for p in parts for b in p.batch_sizes],
            )
        built.description = f"{name} = {built.description}"
        if ds.epoch_length is not None:
            epochized = EpochizeDataset(built.node, ds.epoch_length)
            per = built.batch_size.value if built.batch_size else None
            built = Built(
                epochized,
                f"{built.description}, epochs of {ds.epoch_length} batches",
                ds.epoch_length * per * (world_size or 1) if per else None,
                ds.epoch_length,
                built.batch_size,
                built.batch_sizes,
            )
        return built
    except PrepError as err:
        if err.what.startswith("dataset "):
            raise
        raise PrepError(
            f"dataset {name!r}: {err.what} ({err.where})" if err.where else f"dataset {name!r}: {err.what}",
            where,
            err.fix,
        ) from None


def build_loader(
    cfg: PipelineConfig,
    name: str,
    *,
    step: StepConfig | None = None,
    args: Mapping[str, int | None] | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Any, Built, Resolved]:
    """A `prep.loaders.DataLoader` over dataset `name` for `step`, with its resolved worker count."""
    from prep.loaders import DataLoader

    built = build_dataset(
        cfg, name, step=step, args=args, batch_size=batch_size, rank=rank, world_size=world_size
    )
    workers = resolve_workers(cfg, name, step, args)
    loader = DataLoader(
        built.node,
        num_workers=workers.value,
        rank=rank,
        world_size=world_size,
        persistent_workers=workers.value > 0,
    )
    return loader, built, workers
