"""`.nv-meta/`: the three files, parsed back by megatron-energon's own strict metadata reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prep.formats.nvmeta import dataset_yaml, user_dataset_yaml, write_nv_meta


@pytest.mark.slow  # importing energon takes ~3 s
def test_files_and_energon_reads_them(tmp_path: Path) -> None:
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.metadata import (
        EnergonDatasetType,
        WebdatasetMeta,
        get_dataset_type,
    )

    counts = {"a/shard-000.tar": 3, "shard-001.tar": 2}
    meta = write_nv_meta(tmp_path, counts, ["jpg", "txt"])
    assert sorted(p.name for p in meta.iterdir()) == [".info.json", "dataset.yaml", "split.yaml"]
    info = json.loads((meta / ".info.json").read_text())
    assert info["shard_counts"] == counts
    assert get_dataset_type(EPath(tmp_path)) == EnergonDatasetType.WEBDATASET
    wm = WebdatasetMeta.from_config(EPath(tmp_path), split_part="train")
    assert [(s.name, s.count) for s in wm.shards] == list(counts.items())
    assert wm.shards[0].path == EPath(tmp_path) / "a/shard-000.tar"


def test_sample_type_follows_fields(tmp_path: Path) -> None:
    assert dataset_yaml(["jpg", "json", "txt"]) == {
        "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
        "field_map": {"image": "jpg", "caption": "txt"},
    }
    assert dataset_yaml(["png", "txt"])["field_map"]["image"] == "png"
    assert dataset_yaml(["webp", "png", "jpg", "txt"])["field_map"]["image"] == "jpg,png,webp"
    # members of shards prep did not write, named as they are (energon's field map matches exactly)
    assert dataset_yaml(["PNG", "JPG", "txt"])["field_map"]["image"] == "JPG,PNG"
    crude = dataset_yaml(["vae.npy", "txt"])
    assert crude["__class__"] == "CrudeWebdataset"
    write_nv_meta(tmp_path, {"s.tar": 1}, ["vae.npy"])
    assert yaml.safe_load((tmp_path / ".nv-meta" / "dataset.yaml").read_text()) == crude


def test_rewrite_is_byte_identical(tmp_path: Path) -> None:
    write_nv_meta(tmp_path, {"s.tar": 1}, ["jpg", "txt"])
    before = {p.name: p.read_bytes() for p in (tmp_path / ".nv-meta").iterdir()}
    write_nv_meta(tmp_path, {"s.tar": 1}, ["jpg", "txt"])
    assert {p.name: p.read_bytes() for p in (tmp_path / ".nv-meta").iterdir()} == before


def test_user_dataset_yaml_is_kept(tmp_path: Path) -> None:
    write_nv_meta(tmp_path, {"s.tar": 1}, ["jpg", "txt"])
    path = tmp_path / ".nv-meta" / "dataset.yaml"
    assert path.read_text().startswith("# written by prep") and not user_dataset_yaml(tmp_path)
    write_nv_meta(tmp_path, {"s.tar": 1}, ["vae.npy"])  # prep's own file follows the fields
    assert yaml.safe_load(path.read_text())["__class__"] == "CrudeWebdataset"
    mine = (
        "sample_type:\n  __module__: megatron.energon\n  __class__: ImageSample\nfield_map:\n  image: png\n"
    )
    path.write_text(mine)
    write_nv_meta(tmp_path, {"s.tar": 2}, ["jpg", "txt"])
    assert path.read_text() == mine and user_dataset_yaml(tmp_path)
    assert json.loads((tmp_path / ".nv-meta" / ".info.json").read_text())["shard_counts"] == {"s.tar": 2}
