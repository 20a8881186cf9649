"""A body that ends before its declared Content-Length, or a chunked body that ends before its last chunk, is
incomplete (RFC 9112 §6.3, §7.1): a failed download with that reason, never an image for the filters. Through the
guarded urllib opener that img2dataset uses in the workers, and through `curate` itself (real Ray, real
img2dataset, the scene server on loopback)."""

import http.client
import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from curation.config import CurateConfig, DedupConfig
from curation.safety import INCOMPLETE_PREFIX, IncompleteBodyError, UrlPolicy, guarded_opener
from scenes.serve import start_server

ONLY_127_0_0_1 = UrlPolicy(allow_hosts=("127.0.0.1",))
TAIL = 4096  # bytes on disk after the image that the short responses declare but never send


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    """A 128² noise image: every filter threshold below is off, so only the download decides."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (128, 128, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """full.jpg, chunked.jpg: whole. short_tail.png: a whole PNG received, TAIL more bytes declared (it decodes, so
    only the length can tell). short_mid.jpg: cut in the middle. chunked_short.jpg: chunks, then no last chunk."""
    root = tmp_path_factory.mktemp("site")
    images = {
        "full.jpg": image_bytes(1),
        "chunked.jpg": image_bytes(2),
        "short_tail.png": image_bytes(3, "PNG"),
        "short_mid.jpg": image_bytes(4),
        "chunked_short.jpg": image_bytes(5),
    }
    for name, data in images.items():
        (root / name).write_bytes(data + (b"\0" * TAIL if name == "short_tail.png" else b""))
    rules = {
        "/chunked.jpg": {"chunked": True},
        "/short_tail.png": {"send_bytes": len(images["short_tail.png"])},
        "/short_mid.jpg": {"send_bytes": len(images["short_mid.jpg"]) // 2},
        "/chunked_short.jpg": {"chunked": True, "send_bytes": len(images["chunked_short.jpg"]) // 2},
    }
    (root / "_serve.json").write_text(json.dumps(rules))
    server, base = start_server(root, host="127.0.0.1", port=0)
    yield {"root": root, "base": base, "images": images}
    server.shutdown()
    server.server_close()


def fetch(url: str, amt: int | None = None) -> bytes:
    with guarded_opener(ONLY_127_0_0_1).open(url, timeout=5) as r:
        if amt is None:
            return r.read()
        return b"".join(iter(lambda: r.read(amt), b""))


@pytest.mark.parametrize("name", ["full.jpg", "chunked.jpg"])
@pytest.mark.parametrize("amt", [None, 1000])
def test_whole_bodies_read_whole(site, name, amt):
    assert fetch(f"{site['base']}/{name}", amt) == site["images"][name]


@pytest.mark.parametrize("amt", [None, 1000])
def test_short_body_is_incomplete(site, amt):
    n = len(site["images"]["short_mid.jpg"])
    with pytest.raises(IncompleteBodyError) as err:
        fetch(f"{site['base']}/short_mid.jpg", amt)
    assert str(err.value) == f"{INCOMPLETE_PREFIX}{n // 2} of {n} bytes"
    assert isinstance(err.value, http.client.IncompleteRead)  # whoever catches the standard error still does


def test_chunked_body_without_last_chunk_is_incomplete(site):
    n = len(site["images"]["chunked_short.jpg"]) // 2
    with pytest.raises(IncompleteBodyError, match=f"^{INCOMPLETE_PREFIX}chunked body ended after {n} bytes"):
        fetch(f"{site['base']}/chunked_short.jpg")


def test_the_server_really_cuts_the_body(site):
    """Without the guard, urllib's own read() sees it too: the short responses are short on the wire."""
    with pytest.raises(http.client.IncompleteRead):
        with urllib.request.build_opener().open(f"{site['base']}/short_tail.png", timeout=5) as r:
            r.read()


@pytest.fixture(scope="module")
def manifest(site, tmp_path_factory):
    import pandas as pd
    import ray

    from curation.manifest import read_manifest
    from curation.pipeline import curate

    root = tmp_path_factory.mktemp("curate")
    names = list(site["images"])
    pd.DataFrame({"url": [f"{site['base']}/{n}" for n in names], "caption": names}).to_parquet(root / "urls.parquet")
    cfg = CurateConfig(allow_hosts=["127.0.0.1"], min_area=0, min_blur=0, min_entropy=0, min_luminance=0,
                       max_luminance=1, download={"shard_size": 10, "threads": 4, "max_seconds": 10},
                       dedup=DedupConfig(phash=False, clip=False))
    try:
        curate(root / "urls.parquet", root / "data", cfg)
        yield read_manifest(root / "data").to_pandas().set_index("alt_text")
    finally:
        ray.shutdown()


def test_curate_keeps_whole_images(manifest):
    for name in ("full.jpg", "chunked.jpg"):
        row = manifest.loc[name]
        assert row["status"] == "ok" and row["keep"], row.to_dict()
    assert sorted(manifest.index[manifest["keep"]]) == ["chunked.jpg", "full.jpg"]  # nothing cut short is kept


@pytest.mark.parametrize("name, expected", [
    ("short_tail.png", "{n} of {t} bytes"),
    ("short_mid.jpg", "{h} of {n} bytes"),
    ("chunked_short.jpg", "chunked body ended after {h} bytes"),
])
def test_curate_marks_incomplete_bodies_failed_download(site, manifest, name, expected):
    n = len(site["images"][name])
    row = manifest.loc[name]
    assert (row["status"], row["reject_reason"], row["keep"]) == ("failed_download", "failed_download", False)
    assert row["error"].startswith(INCOMPLETE_PREFIX + expected.format(n=n, t=n + TAIL, h=n // 2)), row["error"]
    assert row[["shard", "member", "sha256", "width"]].isna().all(), row.to_dict()  # no bytes kept
