"""Named encoders for precache_encodings: diffusers VAEs, transformers CLIP/T5 text encoders, open_clip,
and `module:callable` for your own.

Importing this package imports no torch: the config model (`EncoderConfig`) and the up-front checks
(`validate_encoders`) are light; `prep.encoders.models` (torch, loading) is imported only when a task
runs. The loop that reads shards, encodes and writes them is the stage's (`prep.stages.precache_loop`).
"""

from prep.encoders.spec import EncoderConfig
from prep.encoders.storage import load_npy
from prep.encoders.validate import validate_encoders

__all__ = ["EncoderConfig", "load_npy", "validate_encoders"]
