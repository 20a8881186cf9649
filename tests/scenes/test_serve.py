import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from scenes.serve import start_server


@pytest.fixture
def site(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8 fake jpeg bytes \xff\xd9")
    (tmp_path / "images" / "slow.jpg").write_bytes(b"x" * 64)
    (tmp_path / "images" / "gone.jpg").write_bytes(b"here but 410")
    rules = {
        "/images/a.jpg": {"headers": {"X-Robots-Tag": "noai"}},
        "/images/moved.jpg": {"redirect": "/images/a.jpg"},
        "/images/slow.jpg": {"dribble_bytes_per_s": 1},
        "/images/gone.jpg": {"status": 410},
    }
    (tmp_path / "_serve.json").write_text(json.dumps(rules))
    server, base = start_server(tmp_path)
    yield base
    server.shutdown()
    server.server_close()


def test_ok_headers_and_redirect(site):
    with urllib.request.urlopen(f"{site}/images/a.jpg", timeout=5) as reply:
        assert reply.status == 200 and reply.headers["X-Robots-Tag"] == "noai"
        assert reply.headers["Content-Type"] == "image/jpeg" and reply.read().startswith(b"\xff\xd8")
    with urllib.request.urlopen(f"{site}/images/moved.jpg", timeout=5) as reply:  # urllib follows the 302
        assert reply.url.endswith("/images/a.jpg") and reply.read().startswith(b"\xff\xd8")


@pytest.mark.parametrize("path,status", [("/images/missing.jpg", 404), ("/_serve.json", 404),
                                         ("/../etc/passwd", 404), ("/images/gone.jpg", 410)])
def test_error_statuses(site, path, status):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(site + path, timeout=5)
    assert err.value.code == status


def test_dribble_times_out_the_client(site):
    # 1 byte/s: the gap between bytes outlasts the client's 0.5 s socket timeout (a faster dribble would only
    # trip a whole-download deadline, which is the downloader's business).
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        with urllib.request.urlopen(f"{site}/images/slow.jpg", timeout=0.5) as reply:
            reply.read()


def test_dribble_sends_the_body_slowly(site):
    with urllib.request.urlopen(f"{site}/images/slow.jpg", timeout=5) as reply:
        assert reply.headers["Content-Length"] == "64"
        start = time.monotonic()
        assert reply.read(2) == b"xx"
        assert time.monotonic() - start > 1.5


def test_many_concurrent_connections(site):
    def fetch(_):
        with urllib.request.urlopen(f"{site}/images/a.jpg", timeout=10) as reply:
            return reply.status

    with ThreadPoolExecutor(max_workers=64) as pool:
        assert set(pool.map(fetch, range(256))) == {200}


def test_refuses_non_loopback(tmp_path):
    with pytest.raises(ValueError, match="not a loopback"):
        start_server(tmp_path, host="0.0.0.0")
    with pytest.raises(FileNotFoundError):
        start_server(tmp_path / "nope")


def test_serves_a_rendered_scene_web(web_dir):
    import pandas as pd

    server, base = start_server(web_dir)
    try:
        table = pd.read_parquet(web_dir / "urls.parquet")
        for kind in ("broken_link", "optout", "not_image", None):
            row = table[table["fault"].isna()].iloc[0] if kind is None else table[table["fault"] == kind].iloc[0]
            url = row.url.replace("http://127.0.0.1:8000", base)
            if kind == "broken_link":
                with pytest.raises(urllib.error.HTTPError, match="404"):
                    urllib.request.urlopen(url, timeout=5)
                continue
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200
                assert (reply.headers.get("X-Robots-Tag") == "noai") == (kind == "optout")
                assert reply.headers["Content-Type"].startswith("text/html" if kind == "not_image" else "image/jpeg")
    finally:
        server.shutdown()
        server.server_close()
