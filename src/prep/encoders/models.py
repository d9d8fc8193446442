"""The named encoders on real model classes: diffusers VAEs, transformers CLIP/T5 text encoders,
open_clip, and a user's `module:callable`.

Each encoder is split in two: a `Preparer` (decode, resize, tokenize; CPU only, runs in DataLoader
workers, holds no model) and an `Encoder` (collate in the main process, then one batched forward on
the device). Imported only when a precache task runs, so torch and the model libraries stay out of
the CLI's start-up.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from prep.encoders.images import prepare_image
from prep.encoders.spec import EncoderConfig, model_kind
from prep.errors import PrepError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SANE_LENGTH = 100_000  # tokenizers without a limit report 1e30 as model_max_length

# what one forward returns per output member: the batch tensor and, for per-sample trimming, lengths
Output = dict[str, tuple[torch.Tensor, list[int] | None]]


def where_of(cfg: EncoderConfig) -> str:
    return f"precache_encodings.encoders[{cfg.key}]"


def sample_seed(seed: int, key: str) -> int:
    """A per-sample seed, so a `sample` latent depends on the sample, not on batch or rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _pad_ids(rows: Sequence[torch.Tensor], length: int, pad_id: int) -> tuple[torch.Tensor, list[int]]:
    lengths = [int(r.numel()) for r in rows]
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    return ids, lengths


def _stack(items: Sequence[torch.Tensor], pin: bool) -> torch.Tensor:
    """Stack into pinned host memory on CUDA, so the copy to the device can be asynchronous."""
    first = items[0]
    out = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=pin)
    torch.stack(list(items), out=out)
    return out


# ----------------------------------------------------------------------------------------- preparers


class ImagePreparer:
    """Encoded image -> uint8 [H, W, 3]; the group is the size, so a batch never mixes buckets."""

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg

    def prepare(self, datas: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for d in datas:
            try:
                out.append(torch.from_numpy(prepare_image(d, self.cfg)))
            except Exception as err:  # PIL raises many types for damaged images
                out.append(ValueError(f"undecodable image ({type(err).__name__}: {err})"))
        return out

    @staticmethod
    def group(item: torch.Tensor) -> Hashable:
        return tuple(item.shape)


def _captions(datas: list[bytes]) -> list[str]:
    return [d.decode("utf-8", "replace").strip() for d in datas]


class TokenPreparer:
    """Captions -> unpadded token ids (1-D int64), truncated to max_length; padding is done per batch."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def prepare(self, datas: list[bytes]) -> list[Any]:
        ids = self.tokenizer(_captions(datas), truncation=True, max_length=self.max_length, padding=False)[
            "input_ids"
        ]
        return [torch.tensor(row, dtype=torch.long) for row in ids]

    @staticmethod
    def group(item: Any) -> Hashable:
        return None


class OpenClipTokenPreparer(TokenPreparer):
    """open_clip tokenizers pad to their context length themselves."""

    def prepare(self, datas: list[bytes]) -> list[Any]:
        return list(self.tokenizer(_captions(datas)))


class TextPreparer:
    """Captions as strings, for a user's callable that tokenizes itself."""

    def prepare(self, datas: list[bytes]) -> list[Any]:
        return _captions(datas)

    @staticmethod
    def group(item: Any) -> Hashable:
        return None


# ------------------------------------------------------------------------------------------ encoders


class Encoder(ABC):
    """A loaded model plus how to batch for it and what it writes."""

    def __init__(self, cfg: EncoderConfig, model: Any, preparer: Any, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.preparer = preparer
        self.device = device
        self.dtype = DTYPES[cfg.dtype]
        self.pin = device.type == "cuda"

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def collate(self, items: list[Any]) -> Any:
        return _stack(items, self.pin)

    @abstractmethod
    def forward(self, batch: Any, keys: list[str]) -> Output:
        """One batched forward on the device: {member extension: (batch tensor, lengths to trim or None)}."""

    def identity(self) -> dict[str, Any]:
        cls = type(self.model)
        ident: dict[str, Any] = {"model": self.cfg.model, "class": f"{cls.__module__}.{cls.__qualname__}"}
        config = getattr(self.model, "config", None)
        if config is not None:
            doc = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            doc = {k: v for k, v in doc.items() if not k.startswith("_")}
            ident["config_sha256"] = hashlib.sha256(
                json.dumps(doc, sort_keys=True, default=str).encode()
            ).hexdigest()
            commit = getattr(config, "_commit_hash", None)
            if commit:
                ident["commit"] = commit
        ident["settings"] = self.cfg.settings()
        return ident

    def _pixels(self, batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """uint8 NHWC on the host -> normalised float NCHW on the device (channels-last memory)."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        wdtype = self.dtype if self.cfg.cast_weights else torch.float32
        m = torch.tensor(mean, device=self.device, dtype=wdtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=self.device, dtype=wdtype).view(1, 3, 1, 1)
        return (x.to(wdtype) / 255.0 - m) / s


class VaeEncoder(Encoder):
    """diffusers AutoencoderKL-style: `model.encode(x).latent_dist`."""

    def __init__(self, cfg: EncoderConfig, model: Any, device: torch.device, seed: int) -> None:
        super().__init__(cfg, model, ImagePreparer(cfg), device)
        self.seed = seed
        mc = model.config
        self.scale = (
            cfg.scaling_factor
            if cfg.scaling_factor is not None
            else float(getattr(mc, "scaling_factor", 1.0) or 1.0)
        )
        self.shift = (
            cfg.shift_factor
            if cfg.shift_factor is not None
            else float(getattr(mc, "shift_factor", 0.0) or 0.0)
        )
        self.mean = cfg.mean or [0.5, 0.5, 0.5]
        self.std = cfg.std or [0.5, 0.5, 0.5]

    def forward(self, batch: torch.Tensor, keys: list[str]) -> Output:
        x = self._pixels(batch, self.mean, self.std)
        with self.autocast():
            dist = self.model.encode(x).latent_dist
        mode = self.cfg.latent_mode
        if mode == "moments":
            z = dist.parameters
        elif mode == "mean":
            z = (dist.mean - self.shift) * self.scale
        else:
            eps = torch.stack(
                [
                    torch.randn(
                        dist.mean.shape[1:],
                        generator=torch.Generator().manual_seed(sample_seed(self.seed, k)),
                    )
                    for k in keys
                ]
            ).to(self.device, non_blocking=True)
            z = (dist.mean + dist.std * eps.to(dist.mean.dtype) - self.shift) * self.scale
        return {f"{self.cfg.key}.npy": (z, None)}

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["scaling_factor"] = self.scale
        ident["shift_factor"] = self.shift
        ident["mean"], ident["std"] = list(self.mean), list(self.std)
        return ident


class HFTextEncoder(Encoder):
    """transformers CLIPTextModel(WithProjection) / T5EncoderModel on padded token ids."""

    def __init__(self, cfg: EncoderConfig, model: Any, tokenizer: Any, device: torch.device) -> None:
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        length = cfg.max_length or int(tokenizer.model_max_length)
        if length > MAX_SANE_LENGTH:
            raise PrepError("the tokenizer sets no model_max_length", where_of(cfg), "set max_length")
        if limit and length > limit:
            raise PrepError(
                f"max_length {length} exceeds the model's {limit} positions",
                where_of(cfg),
                f"set max_length <= {limit}",
            )
        layers = getattr(model.config, "num_hidden_layers", None)  # T5Config maps it to num_layers
        hidden = cfg.hidden_layer
        if hidden is not None and isinstance(layers, int) and not -layers - 1 <= hidden <= layers:
            raise PrepError(
                f"hidden_layer {hidden} is out of range: the model has {layers + 1} hidden states "
                "(the embeddings, then one per layer)",
                where_of(cfg),
                f"set hidden_layer between {-layers - 1} and {layers} (e.g. -2 for the penultimate layer)",
            )
        super().__init__(cfg, model, TokenPreparer(tokenizer, length), device)
        self.length = length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        is_clip = cfg.model.startswith("transformers:CLIP")
        self.use_mask = cfg.use_attention_mask if cfg.use_attention_mask is not None else not is_clip

    def collate(self, items: list[torch.Tensor]) -> Any:
        longest = max(int(i.numel()) for i in items)
        ids, lengths = _pad_ids(
            items, self.length if self.cfg.padding == "max_length" else longest, self.pad_id
        )
        return (ids.pin_memory() if self.pin else ids), lengths

    def forward(self, batch: Any, keys: list[str]) -> Output:
        ids, lengths = batch
        mask = torch.arange(ids.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        dev_ids = ids.to(self.device, non_blocking=True)
        kwargs: dict[str, Any] = {"output_hidden_states": self.cfg.hidden_layer is not None}
        if self.use_mask:
            kwargs["attention_mask"] = mask.to(self.device, dtype=torch.long, non_blocking=True)
        with self.autocast():
            out = self.model(input_ids=dev_ids, **kwargs)
        hidden = (
            out.last_hidden_state
            if self.cfg.hidden_layer is None
            else out.hidden_states[self.cfg.hidden_layer]
        )
        trim = lengths if self.cfg.padding == "longest" else None
        res: Output = {f"{self.cfg.key}.npy": (hidden, trim)}
        if self.cfg.attention_mask:
            res[f"{self.cfg.key}_mask.npy"] = (mask, trim)
        if self.cfg.pooled:
            pooled = getattr(out, "text_embeds", None)
            res[f"{self.cfg.key}_pooled.npy"] = (pooled if pooled is not None else out.pooler_output, None)
        return res

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["max_length"], ident["pad_token_id"], ident["use_attention_mask"] = (
            self.length,
            self.pad_id,
            self.use_mask,
        )
        return ident


class OpenClipEncoder(Encoder):
    """open_clip's `encode_image` / `encode_text`: one embedding per sample."""

    def __init__(
        self,
        cfg: EncoderConfig,
        model: Any,
        preparer: Any,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(cfg, model, preparer, device)
        self.mean, self.std = list(mean), list(std)

    def forward(self, batch: torch.Tensor, keys: list[str]) -> Output:
        with self.autocast():
            if self.cfg.modality == "image":
                emb = self.model.encode_image(self._pixels(batch, self.mean, self.std))
            else:
                emb = self.model.encode_text(batch.to(self.device, non_blocking=True))
        return {f"{self.cfg.key}.npy": (emb, None)}


class CallableEncoder(Encoder):
    """A user's encoder: images arrive normalised [B, 3, H, W] on the device, text as a list of str;
    it returns a tensor (or array) with one row per sample."""

    def __init__(self, cfg: EncoderConfig, model: Any, device: torch.device) -> None:
        preparer = ImagePreparer(cfg) if cfg.modality == "image" else TextPreparer()
        super().__init__(cfg, model, preparer, device)
        self.mean = cfg.mean or [0.5, 0.5, 0.5]
        self.std = cfg.std or [0.5, 0.5, 0.5]

    def collate(self, items: list[Any]) -> Any:
        return _stack(items, self.pin) if self.cfg.modality == "image" else list(items)

    def forward(self, batch: Any, keys: list[str]) -> Output:
        x = self._pixels(batch, self.mean, self.std) if self.cfg.modality == "image" else batch
        with self.autocast():
            out = self.model(x)
        out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
        if out.shape[0] != len(keys):
            raise PrepError(
                f"{self.cfg.model} returned {out.shape[0]} rows for a batch of {len(keys)}",
                where_of(self.cfg),
                "return one row per input sample",
            )
        return {f"{self.cfg.key}.npy": (out, None)}


# ------------------------------------------------------------------------------------------- loading


def hf_kwargs(subfolder: str | None, revision: str | None, local_files_only: bool) -> dict[str, Any]:
    """from_pretrained's location keywords (only those that are set)."""
    kw: dict[str, Any] = {"local_files_only": local_files_only}
    if subfolder:
        kw["subfolder"] = subfolder
    if revision:
        kw["revision"] = revision
    return kw


def _hf_kwargs(cfg: EncoderConfig, subfolder: str | None) -> dict[str, Any]:
    return hf_kwargs(subfolder, cfg.revision, cfg.local_files_only)


def tokenizer_location(cfg: EncoderConfig) -> tuple[str, str | None]:
    """Where the tokenizer lives: `tokenizer`, else next to the model in the diffusers layout."""
    if cfg.tokenizer_subfolder is not None:
        return cfg.tokenizer or cfg.pretrained or "", cfg.tokenizer_subfolder or None
    sub = cfg.subfolder
    if cfg.tokenizer is None and sub and sub.startswith("text_encoder"):
        sub = "tokenizer" + sub[len("text_encoder") :]
    elif cfg.tokenizer is not None:
        sub = None
    return cfg.tokenizer or cfg.pretrained or "", sub


def load_tokenizer(path: str, subfolder: str | None, cfg: EncoderConfig) -> Any:
    """The text encoder's tokenizer (`AutoTokenizer`), with the encoder's revision and offline flag."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **_hf_kwargs(cfg, subfolder))


def resolve_class(spec: str) -> Any:
    """`diffusers:AutoencoderKL` -> the class; `pkg.mod:fn` -> the callable (import errors propagate)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_model(
    spec: str,
    pretrained: str | None = None,
    *,
    config: dict[str, Any] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    options: dict[str, Any] | None = None,
) -> Any:
    """One model, the way every part of prep loads one: `diffusers:X` / `transformers:X` with
    `from_pretrained(pretrained)` or, given `config` instead, randomly initialised from that config;
    `module:callable` called with `options` (and `pretrained` when set). Import and loading errors
    propagate (the caller knows where the spec came from)."""
    target = resolve_class(spec)
    if model_kind(spec) in ("vae", "hf_text"):
        if config is not None:
            if model_kind(spec) == "hf_text":  # transformers classes take a config object
                return target(target.config_class(**config))
            return target.from_config(config)
        return target.from_pretrained(pretrained, **hf_kwargs(subfolder, revision, local_files_only))
    kwargs = dict(options or {})
    if pretrained:
        kwargs["pretrained"] = pretrained
    return target(**kwargs)


def _finish(model: Any, cfg: EncoderConfig, device: torch.device) -> Any:
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval().requires_grad_(False)
        if cfg.cast_weights:
            model = model.to(DTYPES[cfg.dtype])
    return model


def quiet_library_progress() -> None:
    """Switch off the progress bars diffusers, transformers and the hub draw while loading ("Loading
    weights 36/36"): they would cut through prep's own progress. Their warnings and errors still show."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    for name in ("diffusers", "transformers"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()


def load_encoder(cfg: EncoderConfig, device: torch.device, seed: int = 0) -> Encoder:
    """Load one configured encoder with from_pretrained (or the user's callable) onto `device`."""
    where = where_of(cfg)
    quiet_library_progress()
    try:
        if cfg.kind == "open_clip":
            return _load_open_clip(cfg, device)
        model = load_model(cfg.model, cfg.pretrained, subfolder=cfg.subfolder, revision=cfg.revision,
                           local_files_only=cfg.local_files_only, options=cfg.options)
        if cfg.kind == "vae":
            return VaeEncoder(cfg, _finish(model, cfg, device), device, seed)
        if cfg.kind == "hf_text":
            tok_path, tok_sub = tokenizer_location(cfg)
            tokenizer = load_tokenizer(tok_path, tok_sub, cfg)
            return HFTextEncoder(cfg, _finish(model, cfg, device), tokenizer, device)
        return CallableEncoder(cfg, _finish(model, cfg, device), device)
    except PrepError:
        raise
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as err:
        fix = "check model, pretrained, subfolder and revision (run with --debug for the trace)"
        if cfg.model.startswith("__main__:") and isinstance(err, AttributeError):
            # a worker process starts fresh: a notebook's (or an interactive session's) functions are
            # not in its __main__
            fix = ("define the callable in a module (module:callable), or run in one process "
                   "(--workers 1; RunOptions(workers=1))")
        raise PrepError(
            f"could not load {cfg.model} from {cfg.pretrained!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})",
            where,
            fix,
        ) from err


def _load_open_clip(cfg: EncoderConfig, device: torch.device) -> Encoder:
    try:
        import open_clip
    except ImportError:
        raise PrepError(
            "open_clip is not installed", where_of(cfg), "pip install 'prep[open_clip]' (open-clip-torch)"
        ) from None
    spec = cfg.pretrained or ""
    if spec.startswith("hf-hub:"):
        name, tag = spec, None
    else:
        name, _, tag = spec.partition(":")
    model = open_clip.create_model(name, pretrained=tag or None)
    model = _finish(model, cfg, device)
    if cfg.modality == "text":
        tokenizer = open_clip.get_tokenizer(name)
        return OpenClipEncoder(
            cfg, model, OpenClipTokenPreparer(tokenizer, 0), device, OPENAI_MEAN, OPENAI_STD
        )
    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    img_cfg = cfg.model_copy(update={"resolution": cfg.resolution or int(size)})
    mean = cfg.mean or getattr(visual, "image_mean", None) or OPENAI_MEAN
    std = cfg.std or getattr(visual, "image_std", None) or OPENAI_STD
    return OpenClipEncoder(cfg, model, ImagePreparer(img_cfg), device, mean, std)
