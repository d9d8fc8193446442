"""One encoder entry of `precache_encodings.encoders`: which model, what it reads, what it writes.

Pure pydantic (no torch), so loading the config of any stage stays fast. Static rules are checked
here; the checks that need imports or the file system (classes import, paths exist) are in
`prep.encoders.validate`, run once before any shard is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from prep.models import ConfigModel

DEFAULT_RESOLUTION = 512
IMAGE_SOURCES = ["jpg", "jpeg", "png", "webp"]
TEXT_SOURCES = ["txt"]
KNOWN_MODELS = (
    "diffusers:AutoencoderKL",
    "transformers:CLIPTextModel",
    "transformers:CLIPTextModelWithProjection",
    "transformers:T5EncoderModel",
    "open_clip",
)
IMAGE_ONLY = {
    "resolution",
    "resize",
    "buckets",
    "bucket_step",
    "max_aspect",
    "interpolation",
    "jpeg_draft",
    "mean",
    "std",
    "latent_mode",
    "scaling_factor",
    "shift_factor",
}
TEXT_ONLY = {
    "tokenizer",
    "tokenizer_subfolder",
    "max_length",
    "padding",
    "attention_mask",
    "use_attention_mask",
    "hidden_layer",
    "pooled",
}
Kind = Literal["vae", "hf_text", "open_clip", "callable"]


def model_kind(model: str) -> Kind:
    """The family a `model` spec names: diffusers:X, transformers:X, open_clip or module:callable."""
    if model.startswith("diffusers:"):
        return "vae"
    if model.startswith("transformers:"):
        return "hf_text"
    if model in ("open_clip", "open_clip:"):
        return "open_clip"
    return "callable"


class EncoderConfig(ConfigModel):
    """One frozen encoder. Image encoders read an image member and write latents or embeddings; text
    encoders read a caption member and write token embeddings (plus, optionally, mask and pooled)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    key: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="output name: members are written as KEY.<key>.npy (no dots)",
    )
    modality: Literal["image", "text"] = Field(..., description="image or text")
    source: list[str] = Field(
        default_factory=list,
        description="member extensions to read, first present wins "
        "(default: jpg, jpeg, png, webp for images; txt for text)",
    )
    model: str = Field(
        ...,
        description="diffusers:AutoencoderKL, transformers:CLIPTextModel, "
        "transformers:CLIPTextModelWithProjection, transformers:T5EncoderModel, open_clip, or "
        "module.path:callable for your own encoder",
    )
    pretrained: str | None = Field(
        None,
        description="hub id or local folder for from_pretrained (open_clip: "
        "ARCH:TAG or hf-hub:org/repo; module:callable: passed to the callable)",
    )
    subfolder: str | None = Field(None, description="folder inside `pretrained` (e.g. vae, text_encoder)")
    revision: str | None = Field(None, description="hub branch, tag or commit to load")
    local_files_only: bool = Field(False, description="never contact the hub; load from the local cache only")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="compute dtype (autocast)"
    )
    cast_weights: bool = Field(
        False,
        description="also cast the weights to `dtype` (halves memory; fp16 VAEs "
        "may overflow, so the default keeps float32 weights under autocast)",
    )
    store_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype of the stored .npy: auto = float32 for bfloat16 compute (numpy has no bfloat16), "
        "else `dtype`; bfloat16 stores uint16 bit patterns (see prep.encoders.storage.load_npy)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for a module:callable"
    )

    # images
    resolution: int | None = Field(
        None,
        ge=8,
        description="image side (center_crop/stretch), or bucket area = "
        "resolution² (default: 512; open_clip: the model's image size)",
    )
    resize: Literal["center_crop", "stretch", "buckets"] = Field(
        "center_crop",
        description="center_crop: cover then crop a square; stretch: resize to a square; "
        "buckets: the aspect-ratio bucket closest to the image, cover then crop",
    )
    buckets: list[tuple[int, int]] | None = Field(
        None,
        description="bucket sizes [width, height] (default: "
        "generated from resolution, bucket_step and max_aspect)",
    )
    bucket_step: int = Field(64, ge=8, description="generated bucket sides are multiples of this")
    max_aspect: float = Field(
        2.0, ge=1.0, description="generated buckets span aspect 1/max_aspect .. max_aspect"
    )
    interpolation: Literal["bicubic", "bilinear", "lanczos", "box", "nearest"] = Field(
        "bicubic", description="resampling filter for the resize"
    )
    jpeg_draft: bool = Field(
        True,
        description="let libjpeg decode large JPEGs at a reduced scale (still >= "
        "the target size) before the resize: much faster, visually the same",
    )
    mean: list[float] | None = Field(
        None,
        description="per-channel mean on [0,1] pixels (default: 0.5 for VAEs "
        "so inputs are [-1,1]; the model's own for open_clip)",
    )
    std: list[float] | None = Field(None, description="per-channel std on [0,1] pixels (default: as mean)")
    latent_mode: Literal["moments", "sample", "mean"] = Field(
        "moments",
        description="VAE output: moments = mean and logvar stacked on channels, unscaled (NeMo); "
        "sample = one scaled draw, seeded per sample key; mean = the scaled mean",
    )
    scaling_factor: float | None = Field(
        None, description="latent scale for sample/mean (default: the VAE config's scaling_factor)"
    )
    shift_factor: float | None = Field(
        None,
        description="latent shift for sample/mean, (z - shift) * scale "
        "(default: the VAE config's shift_factor, else 0)",
    )

    # text
    tokenizer: str | None = Field(None, description="tokenizer hub id or folder (default: `pretrained`)")
    tokenizer_subfolder: str | None = Field(
        None,
        description="tokenizer folder inside it (default: tokenizer "
        "for text_encoder, tokenizer_N for text_encoder_N, else subfolder)",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        description="tokens per caption (default: the tokenizer's model_max_length, e.g. 77 for CLIP)",
    )
    padding: Literal["max_length", "longest"] = Field(
        "max_length",
        description="max_length: every caption padded to max_length, stored [max_length, D]; "
        "longest: stored trimmed to its own tokens [n, D]",
    )
    attention_mask: bool = Field(True, description="also store KEY.<key>_mask.npy (bool, one per token)")
    use_attention_mask: bool | None = Field(
        None,
        description="pass the mask to the model (default: no for CLIP, as Stable Diffusion does; yes for T5)",
    )
    hidden_layer: int | None = Field(
        None,
        description="store hidden_states[i] instead of last_hidden_state "
        "(e.g. -2 for SDXL's penultimate CLIP layer)",
    )
    pooled: bool = Field(
        False, description="also store KEY.<key>_pooled.npy (CLIP pooler_output or text_embeds)"
    )

    @field_validator("source", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("source", mode="after")
    @classmethod
    def _strip_dots(cls, v: list[str]) -> list[str]:
        return [e.lstrip(".").lower() for e in v]

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if not self.source:
            self.source = list(IMAGE_SOURCES if self.modality == "image" else TEXT_SOURCES)
        kind = self.kind
        fields = type(self).model_fields
        wrong = {
            f
            for f in (TEXT_ONLY if self.modality == "image" else IMAGE_ONLY)
            if getattr(self, f) != fields[f].get_default(call_default_factory=True)
        }
        if wrong:
            verb = "does" if len(wrong) == 1 else "do"
            raise ValueError(f"{', '.join(sorted(wrong))} {verb} not apply to a {self.modality} encoder")
        if kind == "vae" and self.modality != "image":
            raise ValueError(f"{self.model} encodes images: set modality: image")
        if kind == "hf_text" and self.modality != "text":
            raise ValueError(f"{self.model} encodes text: set modality: text")
        if kind != "callable" and not self.pretrained:
            raise ValueError(f"{self.model} needs `pretrained` (a hub id or a local folder)")
        if kind == "callable" and self.model.count(":") != 1:
            raise ValueError(
                f"model {self.model!r} is none of {', '.join(KNOWN_MODELS)} and not module:callable"
            )
        if self.latent_mode != "moments" and kind != "vae":
            raise ValueError("latent_mode applies to diffusers VAEs only")
        if self.pooled and not self.model.startswith("transformers:CLIP"):
            raise ValueError("pooled: true needs a CLIP text model (T5 has no pooled output)")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {len(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.buckets is not None and (not self.buckets or any(w < 8 or h < 8 for w, h in self.buckets)):
            raise ValueError("buckets must be a non-empty list of [width, height], each side >= 8")
        return self

    @property
    def kind(self) -> Kind:
        return model_kind(self.model)

    @property
    def compute_store_dtype(self) -> str:
        """The dtype arrays are stored in: `auto` keeps the compute dtype except bfloat16 -> float32."""
        if self.store_dtype != "auto":
            return self.store_dtype
        return "float32" if self.dtype == "bfloat16" else self.dtype

    def field_names(self) -> list[str]:
        """Member extensions this encoder writes (without the sample key)."""
        names = [f"{self.key}.npy"]
        if self.modality == "text" and self.attention_mask and self.kind == "hf_text":
            names.append(f"{self.key}_mask.npy")
        if self.pooled:
            names.append(f"{self.key}_pooled.npy")
        return names

    def settings(self) -> dict[str, Any]:
        """Every setting that decides the output, for the manifest (defaults included)."""
        skip = TEXT_ONLY if self.modality == "image" else IMAGE_ONLY
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
