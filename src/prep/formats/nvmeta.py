"""`.nv-meta/`: Megatron-Energon's dataset description, so energon loads a prep folder as it is.

`.info.json` holds the sample count of each shard, `split.yaml` puts every shard in the train split,
and `dataset.yaml` names the sample type (captioning when the shards hold an image and a caption,
otherwise energon's crude samples). With several image formats (a folder ingested with its PNGs and
JPEGs kept), the image field lists them all (`image: jpg,png`): energon's field_map takes the first
member a sample has, so every sample loads. Image members of shards prep did not write may be named in
upper case (`JPG`); they are listed under their own names, which energon matches exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from prep import __version__
from prep.formats.atomic import write_text_atomic
from prep.formats.names import IMAGE_EXTS, canonical_ext

NV_META = ".nv-meta"
CAPTION_EXTS = ("txt",)
PREP_HEADER = "# written by prep generate_wdinfo; remove this line to keep your edits on the next run\n"


def dataset_yaml(fields: Sequence[str]) -> dict:
    images = [f for e in IMAGE_EXTS for f in sorted(fields) if canonical_ext(f) == e]  # `JPG` too
    caption = next((e for e in CAPTION_EXTS if e in fields), None)
    if images and caption:
        return {
            "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
            "field_map": {"image": ",".join(images), "caption": caption},
        }
    return {"__module__": "megatron.energon", "__class__": "CrudeWebdataset", "subflavors": {}}


def user_dataset_yaml(folder: str | os.PathLike[str]) -> bool:
    """True when `.nv-meta/dataset.yaml` exists and was not written by prep (the user's or energon's
    wizard's choice of sample type and field map): prep then leaves it alone."""
    path = Path(folder) / NV_META / "dataset.yaml"
    try:
        return not path.read_text("utf-8").startswith(PREP_HEADER)
    except FileNotFoundError:
        return False


def write_nv_meta(folder: str | os.PathLike[str], shard_counts: Mapping[str, int],
                  fields: Sequence[str], split: str = "train") -> Path:
    """Write the three files; shard names are relative to `folder` as energon expects. A dataset.yaml
    that prep did not write is kept (see `user_dataset_yaml`)."""
    meta = Path(folder) / NV_META
    meta.mkdir(parents=True, exist_ok=True)
    info = {"energon_version": f"prep {__version__}", "shard_counts": dict(shard_counts)}
    write_text_atomic(meta / ".info.json", json.dumps(info, indent=2) + "\n")
    splits = {"split_parts": {split: list(shard_counts)}, "exclude": []}
    write_text_atomic(meta / "split.yaml", yaml.safe_dump(splits, sort_keys=False))
    if not user_dataset_yaml(folder):
        text = PREP_HEADER + yaml.safe_dump(dataset_yaml(fields), sort_keys=False)
        write_text_atomic(meta / "dataset.yaml", text)
    return meta
