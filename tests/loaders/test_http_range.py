"""`io/http_range.get_range_into`, the shard cache's download path, against a real loopback server."""

import os

import pytest

from prep.loaders.io.http_range import FetchError, get_range_into
from prep.testing.servers import serve_files

BLOB = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "blob.bin").write_bytes(BLOB)
    return tmp_path


def _get(url, start, end, tmp_path, headers=None):
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(out, 0)
        got = get_range_into(url, start, end, headers or {}, out, 60.0)
        return got, os.pread(out, end, 0)[start:]
    finally:
        os.close(out)


@pytest.mark.parametrize(("start", "end"), [(0, 1), (0, len(BLOB)), (5, 300_001), (len(BLOB) - 7, len(BLOB))])
def test_the_range_lands_at_its_own_offsets(root, tmp_path, start, end):
    with serve_files(root) as srv:
        got, data = _get(srv.url + "/blob.bin", start, end, tmp_path)
    assert got == end - start and data == BLOB[start:end]


def test_a_connection_the_server_closed_is_opened_again(root, tmp_path):
    with serve_files(root) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        assert _get(srv.url + "/blob.bin", 0, 10, tmp_path)[1] == BLOB[:10]  # keeps a connection open
    with serve_files(root, port=port) as again:  # a new server: the kept connection is dead
        assert _get(again.url + "/blob.bin", 10, 20, tmp_path)[1] == BLOB[10:20]
        assert len(again.gets("/blob.bin")) == 1  # asked of the new server, on a new connection


def test_errors_carry_the_status_and_no_url(root, tmp_path):
    with serve_files(root, token="s3cret") as srv:
        with pytest.raises(FetchError) as denied:
            _get(srv.url + "/blob.bin?sig=s3cret", 0, 10, tmp_path)
        with pytest.raises(FetchError) as missing:
            _get(srv.url + "/nope.bin", 0, 10, tmp_path, {"Authorization": "Bearer s3cret"})
    assert denied.value.status == 401 and missing.value.status == 404
    assert "s3cret" not in str(denied.value) and "127.0.0.1" not in str(missing.value)
    with serve_files(root, ranges=False) as plain, pytest.raises(FetchError) as ignored:
        _get(plain.url + "/blob.bin", 10, 20, tmp_path)
    assert ignored.value.status == 200 and "Range" in str(ignored.value)
    with serve_files(root, ranges=False) as plain:  # a 200 that is exactly the range asked for is fine
        assert _get(plain.url + "/blob.bin", 0, len(BLOB), tmp_path)[1] == BLOB


def test_a_refused_connection_is_a_fetch_error(tmp_path):
    with serve_files(tmp_path) as srv:
        url = srv.url + "/x"
    with pytest.raises(FetchError) as err:
        _get(url, 0, 10, tmp_path)
    assert err.value.status is None and "Connection" in str(err.value)
