"""Remote shards: served by a loopback HTTP server (Range requests, bearer token), read through URLs."""

import pytest

from prep.errors import PrepError
from prep.loaders import DataLoader, ShardDataset
from prep.testing.loader_data import make_shards, planned_keys
from prep.testing.servers import serve_files

TOKEN = "s3cr3t-token-for-tests"
SIZES = [6, 4, 5]


@pytest.fixture
def served(tmp_path_factory):  # a server per test: no keep-alive connection outlives its test
    root = tmp_path_factory.mktemp("remote")
    keys = make_shards(root / "ds", SIZES, image_size=8)
    make_shards(root / "noidx", SIZES[:1], image_size=8, index=False, manifest=False)
    with serve_files(root, token=TOKEN) as srv:
        yield srv.url, srv, keys


def test_brace_pattern_of_urls_reads_like_local(served):
    url, seen, keys = served
    src = f"{url}/ds/shard-{{00000..00002}}.tar"
    ds = ShardDataset(
        src, batch_size=4, decode="uint8", image_size=8, shuffle=False, token=TOKEN, rank=0, world_size=1
    )
    assert ds.total == sum(SIZES)
    assert planned_keys(ds) == keys
    assert seen.requests and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in seen.requests)


def test_remote_folder_manifest_and_shuffled_workers(served):
    url, _, keys = served
    ds = ShardDataset(f"{url}/ds/", batch_size=4, decode="raw", seed=3, token=TOKEN, rank=0, world_size=1)
    got = [k for b in DataLoader(ds, num_workers=1, rank=0, world_size=1) for k in b["__key__"]]
    assert sorted(got) == sorted(keys) and got != keys


def test_remote_tar_without_index_is_scanned(served):
    url, _, keys = served
    ds = ShardDataset(
        f"{url}/noidx/shard-00000.tar",
        batch_size=6,
        decode="raw",
        shuffle=False,
        token=TOKEN,
        rank=0,
        world_size=1,
    )
    assert planned_keys(ds) == keys[:6]


def test_bad_token_fails_clearly_without_showing_it(served):
    url, _, _ = served
    with pytest.raises(PrepError) as err:
        ShardDataset(f"{url}/ds/", batch_size=2, token="wrong-" + TOKEN, rank=0, world_size=1)
    assert "401" in str(err.value) and "Authorization" in str(err.value)
    assert TOKEN not in str(err.value)


def test_missing_remote_shard_is_named(served):
    url, _, _ = served
    with pytest.raises(PrepError, match=r"shard-09999\.tar"):
        ShardDataset(f"{url}/ds/shard-09999.tar", batch_size=2, token=TOKEN, rank=0, world_size=1)
