"""Fixtures of the caption client tests: a minimal DATA (a manifest of several parts + one download tar of rendered
scenes, built directly rather than by `lensforge curate`: ~1 s instead of ~40 s) and the local endpoint over
loopback.

Names are prefixed `cap_` so they do not collide with the endpoint's and the Batch API's own fixtures."""

import io
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from curation.manifest import make_key
from scenes import render_dataset
from scenes.config import ScenesConfig
from tests.captioning.manifests import write_parted_manifest

N_IMAGES = 12
PART_ROWS = 5  # manifest rows per part: 12 images → 3 parts, so Ray workers and per-part planning get several
REJECTED = {3, 7}  # rows the manifest does not keep: never captioned
SECRET = "sk-lensforge-test-SECRET-0123456789abcdef"  # must never appear in any file under DATA


def build_data(root: Path, n: int = N_IMAGES) -> Path:
    """DATA with manifest/part-0000{0,1,...}.parquet (PART_ROWS rows each) and download/00000.tar ({key}.jpg
    members), img2dataset's layout."""
    scenes = root / "scenes"
    urls = pd.read_parquet(render_dataset(ScenesConfig(n=n, faults=0.0, seed=5, size=256), scenes))
    data = root / "data"
    (data / "download").mkdir(parents=True)
    rows = []
    with tarfile.open(data / "download" / "00000.tar", "w") as tar:
        for i, row in urls.iterrows():
            key = make_key(i)
            raw = (scenes / "images" / f"{i:06d}.jpg").read_bytes()
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            keep = i not in REJECTED
            rows.append({"key": key, "url": row["url"], "alt_text": row["caption"], "status": "ok",
                         "width": 256, "height": 256, "keep": keep, "reject_reason": None if keep else "blur",
                         "shard": "00000.tar", "member": f"{key}.jpg"})
    write_parted_manifest(rows, data, PART_ROWS)
    return data


@pytest.fixture(scope="session")
def cap_template(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("cap-template"))


@pytest.fixture
def cap_data(cap_template, tmp_path) -> Path:
    """A fresh copy of the template DATA for one test."""
    return Path(shutil.copytree(cap_template, tmp_path / "data"))


@pytest.fixture(scope="session")
def cap_large_template(tmp_path_factory) -> Path:
    """48 images (46 kept): enough work (~90 requests with two variants) to kill a run several times midway."""
    return build_data(tmp_path_factory.mktemp("cap-large-template"), n=48)


@pytest.fixture
def cap_large_data(cap_large_template, tmp_path) -> Path:
    return Path(shutil.copytree(cap_large_template, tmp_path / "data"))


@pytest.fixture
def cap_secret() -> str:
    return SECRET


@pytest.fixture
def kept_keys() -> list[str]:
    return [make_key(i) for i in range(N_IMAGES) if i not in REJECTED]


@pytest.fixture(scope="module")
def cap_server():
    from captioning.endpoint import start_endpoint

    handle, base_url = start_endpoint(api_key=SECRET)
    yield handle, base_url
    handle.stop()


@pytest.fixture
def cap_endpoint(cap_server, monkeypatch):
    """(handle, base_url) with stats and faults reset, and the key in OPENAI_API_KEY."""
    handle, base_url = cap_server
    handle.reset()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return handle, base_url
