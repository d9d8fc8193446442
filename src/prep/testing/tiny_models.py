"""Small, randomly initialised *real* encoder classes, saved with `save_pretrained` so the real loading
code runs offline: diffusers' `AutoencoderKL`, transformers' `CLIPTextModel` with a `CLIPTokenizer`
built from a generated vocabulary, and `T5EncoderModel` with a generated fast tokenizer.

Used by the tests and by the embedded offline demo (`make shards`); nothing is downloaded. The folder
layout mirrors a diffusers pipeline repo (`vae/`, `text_encoder/` + `tokenizer/`, `text_encoder_2/` +
`tokenizer_2/`), so configs written against it look like configs for Stable Diffusion.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SEED = 0
CLIP_MAX_LENGTH = 32
T5_MAX_LENGTH = 64


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: every byte as a printable character (GPT-2's BPE alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: Path, max_length: int = CLIP_MAX_LENGTH) -> Path:
    """A real `CLIPTokenizer` with every byte, every byte + `</w>`, and a few merges of common letters."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    base = _byte_chars()
    vocab = base + [c + "</w>" for c in base]
    merges = ["t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "a t</w>", "s t"]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return folder


def write_t5_tokenizer(folder: Path, max_length: int = T5_MAX_LENGTH) -> Path:
    """A fast word-level tokenizer with T5's special tokens (`<pad>`=0, `</s>`=1, `<unk>`=2) and an
    end-of-sequence post-processor, saved as `tokenizer.json` so `AutoTokenizer` loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = [
        "<pad>",
        "</s>",
        "<unk>",
        *list(string.ascii_lowercase),
        *list(string.digits),
        "a",
        "the",
        "photo",
        "of",
        "cat",
        "dog",
        "red",
        "blue",
        "on",
        "in",
        "with",
        "image",
        "sample",
    ]
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
    fast.save_pretrained(str(folder))
    return folder


def write_tiny_vae(folder: Path, *, latent_channels: int = 4, scaling_factor: float = 0.5) -> Path:
    """An `AutoencoderKL` with SD's block structure at toy width (downsamples by 2)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(str(folder))
    return folder


def write_tiny_clip_text(folder: Path, tokenizer_folder: Path) -> Path:
    """A `CLIPTextModel` sized for the generated tokenizer's vocabulary."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(SEED)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=16,
    )
    CLIPTextModel(cfg).eval().save_pretrained(str(folder))
    return folder


def write_tiny_t5(folder: Path, tokenizer_folder: Path) -> Path:
    """A `T5EncoderModel` sized for the generated T5 tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(SEED)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg.decoder_start_token_id = 0
    T5EncoderModel(cfg).eval().save_pretrained(str(folder))
    return folder


def write_tiny_models(root: str | Path) -> dict[str, Path]:
    """Write every tiny model under `root` in a diffusers-like layout; return {part: folder}.

    Idempotent: a part whose folder already holds a config is left as it is.
    """
    from prep.encoders.models import quiet_library_progress

    quiet_library_progress()  # "Writing model shards" bars would cut through `make shards`' output
    root = Path(root)
    parts = {
        "vae": root / "vae",
        "tokenizer": root / "tokenizer",
        "text_encoder": root / "text_encoder",
        "tokenizer_2": root / "tokenizer_2",
        "text_encoder_2": root / "text_encoder_2",
    }
    done = {
        name: (p / ("tokenizer_config.json" if name.startswith("tokenizer") else "config.json")).exists()
        for name, p in parts.items()
    }
    if not done["vae"]:
        write_tiny_vae(parts["vae"])
    if not done["tokenizer"]:
        write_clip_tokenizer(parts["tokenizer"])
    if not done["text_encoder"]:
        write_tiny_clip_text(parts["text_encoder"], parts["tokenizer"])
    if not done["tokenizer_2"]:
        write_t5_tokenizer(parts["tokenizer_2"])
    if not done["text_encoder_2"]:
        write_tiny_t5(parts["text_encoder_2"], parts["tokenizer_2"])
    return parts
