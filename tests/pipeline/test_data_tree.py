"""Each dataset type in a pipeline YAML builds the tree the same code builds by hand: same loader
fingerprint, same first 50 batch keys (across epoch ends, with set_epoch). Remote shards come from a
loopback HTTP server with a bearer token."""

import json

import pytest

from prep.loaders import (
    BlendDataset,
    ConcatDataset,
    DataLoader,
    EpochizeDataset,
    LocalDataset,
    MixBatchDataset,
    ShardDataset,
    Source,
)
from prep.pipeline import parse_pipeline_config
from prep.pipeline.data import build_loader
from prep.testing.loader_data import jpeg_bytes, make_shards
from prep.testing.servers import serve_files

TOKEN = "hf_pipeline-test-token-123"
N = 50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe-data")
    make_shards(root / "laion", [7, 6, 8], image_size=8, distinct_images=2)
    make_shards(root / "art", [5, 6], image_size=8, distinct_images=2, prefix="art")
    make_shards(root / "val", [4], image_size=8, distinct_images=1)
    images = root / "local" / "images"
    images.mkdir(parents=True)
    lines = []
    for i in range(11):
        (images / f"im{i:02d}.jpg").write_bytes(jpeg_bytes(i, 8))
        lines.append(f"im{i:02d}.jpg\tcaption {i}")
    (root / "local" / "captions.txt").write_text("\n".join(lines) + "\n")
    with serve_files(root, token=TOKEN) as srv:
        yield root, srv


def _first_keys(loader, n: int = N) -> list[list[str]]:
    out: list[list[str]] = []
    epoch = 0
    while len(out) < n:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(list(batch["__key__"]))
            if len(out) == n:
                break
        epoch += 1
    return out


def _same_tree(cfg, dataset: str, hand, steps_key: str = "n_epochs") -> None:
    loader, built, workers = build_loader(cfg, dataset, step=cfg.steps[0], rank=0, world_size=1)
    assert workers.value == 0
    by_hand = DataLoader(hand, rank=0, world_size=1)
    assert loader.state_dict()["fingerprint"] == by_hand.state_dict()["fingerprint"]
    assert built.node.fingerprint() == hand.fingerprint()
    keys = _first_keys(loader)
    assert keys == _first_keys(by_hand)
    assert len(keys) == N and len({k for b in keys for k in b}) > 5


def _cfg(datasets: dict, dataset: str, **step) -> object:
    return parse_pipeline_config(
        {
            "datasets": datasets,
            "defaults": {"workers": 0, "seed": 42},
            "steps": [{"name": "s", "dataset": dataset, "n_epochs": 1, **step}],
        }
    )


def _shards(src, **kw):
    return ShardDataset(src, decode="raw", rank=0, world_size=1, **kw)


def test_local(data):
    root, _ = data
    cfg = _cfg(
        {
            "lr": {
                "type": "local",
                "image_folder": str(root / "local" / "images"),
                "captions_file": str(root / "local" / "captions.txt"),
                "batch_size": 3,
                "seed": 5,
                "decode": "raw",
            }
        },
        "lr",
    )
    hand = LocalDataset(
        root / "local" / "images",
        root / "local" / "captions.txt",
        batch_size=3,
        seed=5,
        decode="raw",
        rank=0,
        world_size=1,
    )
    _same_tree(cfg, "lr", hand)


def test_prep_folder_and_manifest(data):
    root, _ = data
    for path in (root / "art", root / "art" / "manifest.json"):
        cfg = _cfg(
            {"art": {"type": "prep", "path": str(path), "decode": "raw", "image_size": 8}},
            "art",
            batch_size=4,
        )
        _same_tree(cfg, "art", _shards(root / "art", batch_size=4, seed=42, image_size=(8, 8)))


def test_webdataset_over_https_pattern_with_token(data, monkeypatch):
    _, srv = data
    monkeypatch.setenv("LAION_TOKEN", TOKEN)
    url = f"{srv.url}/laion/shard-{{00000..00002}}.tar"
    cfg = _cfg(
        {
            "laion": {
                "type": "webdataset",
                "webdataset_url": url,
                "webdataset_token": "${LAION_TOKEN}",
                "webdataset_image_key": "jpg",
                "webdataset_caption_key": "txt",
                "batch_size": 4,
                "decode": "raw",
                "shuffle": False,
            }
        },
        "laion",
    )
    before = len(srv.requests)
    hand = _shards(url, batch_size=4, seed=42, shuffle=False, fields=["jpg", "txt"], token=TOKEN)
    _same_tree(cfg, "laion", hand)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in srv.requests[before:])


def test_webdataset_local_pattern_with_label_key(data):
    root, _ = data
    pattern = str(root / "laion" / "shard-{00000..00002}.tar")
    cfg = _cfg(
        {
            "laion": {
                "type": "webdataset",
                "webdataset_url": pattern,
                "webdataset_image_key": "jpg",
                "webdataset_caption_key": "txt",
                "webdataset_label_key": "json",
                "batch_size": 5,
                "seed": 3,
                "decode": "raw",
            }
        },
        "laion",
    )
    _same_tree(cfg, "laion", _shards(pattern, batch_size=5, seed=3, fields=["jpg", "txt", "json"]))


def test_blend_sources_keep_their_batch_sizes(data):
    root, _ = data
    cfg = _cfg(
        {
            "laion": {"type": "prep", "path": str(root / "laion"), "batch_size": 4, "seed": 1},
            "art": {"type": "prep", "path": str(root / "art"), "batch_size": 2},
            "mixed": {
                "type": "blend",
                "sources": [{"dataset": "laion", "weight": 0.7}, {"dataset": "art", "weight": 0.3}],
                "schedule": "smooth",
                "seed": 9,
                "decode": "raw",
            },
        },
        "mixed",
    )
    hand = BlendDataset(
        Source(_shards(root / "laion", batch_size=4, seed=1), 0.7, name="laion"),
        Source(_shards(root / "art", batch_size=2, seed=9), 0.3, name="art"),
        seed=9,
        schedule="smooth",
    )
    _same_tree(cfg, "mixed", hand)


def test_mix_in_batch_with_virtual_epochs(data):
    root, _ = data
    cfg = _cfg(
        {
            "laion": {"type": "prep", "path": str(root / "laion")},
            "art": {"type": "prep", "path": str(root / "art"), "seed": 4},
            "inbatch": {
                "type": "mix",
                "sources": [{"dataset": "laion", "weight": 3}, {"dataset": "art", "weight": 1}],
                "counts": "stratified",
                "batch_size": 4,
                "decode": "raw",
                "epoch_length": 7,
            },
        },
        "inbatch",
    )
    hand = EpochizeDataset(
        MixBatchDataset(
            Source(_shards(root / "laion", batch_size=4, seed=42), 3, name="laion"),
            Source(_shards(root / "art", batch_size=4, seed=4), 1, name="art"),
            batch_size=4,
            counts="stratified",
            seed=42,
            world_size=1,
        ),
        7,
    )
    _same_tree(cfg, "inbatch", hand)


def test_concat(data):
    root, _ = data
    cfg = _cfg(
        {
            "art": {"type": "prep", "path": str(root / "art"), "batch_size": 3},
            "val": {"type": "prep", "path": str(root / "val"), "shuffle": False},
            "both": {"type": "concat", "datasets": ["art", "val"], "decode": "raw"},
        },
        "both",
    )
    hand = ConcatDataset(
        _shards(root / "art", batch_size=3, seed=42),
        _shards(root / "val", batch_size=2, seed=42, shuffle=False),
    )
    _same_tree(cfg, "both", hand)


def test_step_batch_size_overrides_every_leaf(data):
    root, _ = data
    cfg = _cfg(
        {
            "laion": {"type": "prep", "path": str(root / "laion"), "batch_size": 4},
            "art": {"type": "prep", "path": str(root / "art"), "batch_size": 2},
            "mixed": {
                "type": "blend",
                "sources": [{"dataset": "laion"}, {"dataset": "art"}],
                "decode": "raw",
            },
        },
        "mixed",
        batch_size=3,
    )
    _, built, _ = build_loader(cfg, "mixed", step=cfg.steps[0], rank=0, world_size=1)
    assert [(n, r.value, r.source) for n, r in built.batch_sizes] == [
        ("laion", 3, "step"),
        ("art", 3, "step"),
    ]
    assert json.dumps(built.node.fingerprint()).count('"global_batch": 3') == 2
