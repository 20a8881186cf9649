"""`curate` in process over a loopback site (real Ray, real img2dataset): URLs as people write them (non-ASCII
characters, spaces, a full-width host) are vetted and fetched as URIs and keep their own form in the manifest; a
run that keeps nothing fails in one line naming the filter, its threshold and the setting to change."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curation.config import CurateConfig, DedupConfig
from curation.manifest import read_manifest
from curation.pipeline import curate
from scenes.serve import start_server

SMALL = 12  # 64² renders: all below Lens's 384² minimum area


def jpeg(seed: int, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    images = {"画像.jpg": jpeg(1, 128), "a b.jpg": jpeg(2, 128)}
    for name, data in images.items():
        (root / name).write_bytes(data)
    (root / "small").mkdir()
    for i in range(SMALL):
        (root / "small" / f"{i}.jpg").write_bytes(jpeg(10 + i, 64))
    server, base = start_server(root, host="127.0.0.1", port=0)
    yield {"base": base, "images": images}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray runtime for the module: both runs admit 127.0.0.1 with the default response caps."""
    import ray

    yield
    ray.shutdown()


def test_urls_with_non_ascii_characters_or_spaces_are_downloaded_and_keep_their_form(site, ray_session, tmp_path):
    base, port = site["base"], site["base"].rsplit(":", 1)[1]
    urls = {
        "non_ascii": f"{base}/画像.jpg",
        "space": f"{base}/a b.jpg",
        "encoded": f"{base}/%E7%94%BB%E5%83%8F.jpg",  # the same file as non_ascii, as a URI
        "full_width_host": f"http://１２７.０.０.１:{port}/a b.jpg",  # IDNA: 127.0.0.1
        "full_width_localhost": f"http://ｌｏｃａｌｈｏｓｔ:{port}/画像.jpg",  # IDNA: localhost, never fetched
    }
    pd.DataFrame({"url": list(urls.values()), "caption": list(urls)}).to_parquet(tmp_path / "urls.parquet")
    cfg = CurateConfig(allow_hosts=["127.0.0.1"], min_area=0, min_blur=0, min_entropy=0, min_luminance=0,
                       max_luminance=1, download={"shard_size": 10, "threads": 4},
                       dedup=DedupConfig(exact=False, phash=False, clip=False))
    curate(tmp_path / "urls.parquet", tmp_path / "data", cfg)
    manifest = read_manifest(tmp_path / "data").to_pandas().set_index("alt_text")

    assert list(manifest["url"]) == list(urls.values())  # the manifest keeps each URL as the input wrote it
    for name, file in [("non_ascii", "画像.jpg"), ("space", "a b.jpg"), ("encoded", "画像.jpg"),
                       ("full_width_host", "a b.jpg")]:
        row = manifest.loc[name]
        assert (row["status"], row["keep"]) == ("ok", True), row.to_dict()
        assert row["sha256"] == hashlib.sha256(site["images"][file]).hexdigest()
    refused = manifest.loc["full_width_localhost"]
    assert refused["reject_reason"] == "unsafe_url" and "localhost is a local name" in refused["error"]


def test_a_run_that_keeps_nothing_fails_naming_the_filter_and_its_setting(site, ray_session, tmp_path, capsys):
    """Through the command line's own error path: one line, exit status 2; the manifest and report are written."""
    from pipelines.cli import main

    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"url": [f"{site['base']}/small/{i}.jpg" for i in range(SMALL)]}).to_parquet(urls)
    code = main(["curate", "--urls", str(urls), "--out", str(tmp_path / "data"), "--allow-hosts", "127.0.0.1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lensforge:")]
    assert code == 2
    assert errors == [f"lensforge: error: curate: kept 0 of {SMALL}: min_area rejected {SMALL} (images below 147456 "
                      "px = 384²); lower curate.min_area to keep them"]
    manifest = read_manifest(tmp_path / "data").to_pandas()
    assert len(manifest) == SMALL and (manifest["reject_reason"] == "min_area").all()
    assert (tmp_path / "data" / "reports" / "curation.html").is_file()
