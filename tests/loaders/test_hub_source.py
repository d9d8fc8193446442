"""`hf://` sources read at the hub's resolve URLs: a real loopback stand-in of the hub (`serve_hub`, set
as HF_ENDPOINT), ranged reads and the shard cache, revisions, and where the token goes."""

import pytest

from prep.errors import PrepError
from prep.loaders import ShardDataset
from prep.testing.loader_data import make_shards, planned_keys
from prep.testing.servers import serve_files, serve_hub

TOKEN = "hf_tok-0f-the-hub-tests"
REPO = "me/shards"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_src")
    make_shards(root / "ds", [24, 16, 20], image_size=8)
    return root


@pytest.fixture()
def hub(local, monkeypatch):
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in (local / "ds").iterdir()}
    with serve_hub(REPO, {"main": files, "v1": files}, token=TOKEN) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield srv


def _ds(source, **kw):
    return ShardDataset(source, batch_size=8, seed=5, decode="raw", window_shards=2, rank=0, world_size=1,
                        **kw)


@pytest.mark.parametrize("cached", [False, True])
def test_an_hf_folder_reads_the_same_samples_as_the_local_copy(local, hub, tmp_path, cached):
    kw = {"cache_dir": tmp_path / "cache"} if cached else {}
    got = planned_keys(_ds(f"hf://datasets/{REPO}/ds", token=TOKEN, **kw))
    assert got == planned_keys(_ds(local / "ds"))
    paths = [r.path for r in hub.log.requests]
    assert any("/resolve/main/ds/shard-" in p for p in paths)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.log.requests)


def test_hf_token_from_the_environment_and_a_revision(local, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    tars = [f"hf://datasets/{REPO}@v1/ds/shard-{i:05d}.tar" for i in range(3)]
    assert planned_keys(_ds(tars)) == planned_keys(_ds(sorted((local / "ds").glob("*.tar"))))
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in hub.log.requests} == {"v1"}


def test_hf_token_from_the_environment_never_reaches_another_host(local, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with serve_files(local) as other:
        with pytest.raises(PrepError):  # without the token the hub answers 401: HF_TOKEN was not used
            planned_keys(_ds([f"hf://datasets/{REPO}/ds/shard-00000.tar", other.url + "/ds/shard-00001.tar"]))
        assert not any("authorization" in r.headers for r in other.requests)


def test_a_missing_repo_file_is_one_line_naming_it(hub):
    with pytest.raises(PrepError) as err:
        _ds(f"hf://datasets/{REPO}/nowhere", token=TOKEN)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value) and TOKEN not in str(err.value)
