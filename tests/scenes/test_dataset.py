import hashlib
import io
import json
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scenes.config import ScenesConfig
from scenes.dataset import assign_faults, render_dataset
from scenes.faults import BOMB_SIDE, FAULT_KINDS
from scenes.parse import parse
from scenes.scene import Scene


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_urls_table(web_dir):
    table = pd.read_parquet(web_dir / "urls.parquet")
    assert list(table.columns) == ["url", "caption", "fault", "source", "scene_id"]
    assert len(table) == 40 and table["fault"].notna().sum() == 15
    assert set(table["fault"].dropna()) == set(FAULT_KINDS)
    assert table["url"].str.startswith("http://127.0.0.1:8000/images/").all()
    assert (table["source"].notna() == table["fault"].isin(["exact_duplicate", "near_duplicate"])).all()


def test_every_fault_is_well_formed(web_dir):
    table = pd.read_parquet(web_dir / "urls.parquet")
    serve = json.loads((web_dir / "_serve.json").read_text())
    for row in table.itertuples():
        path = web_dir / row.url.split("127.0.0.1:8000/")[1]
        truth = json.loads((web_dir / "scenes" / f"{row.scene_id}.json").read_text())
        assert truth["fault"] == row.fault
        kind = row.fault
        if kind == "broken_link":
            assert not path.exists()
            continue
        data = path.read_bytes()
        if kind is None or kind == "optout":
            image = _open(data)
            assert image.size == (64, 64) and image.format == "JPEG"
            expected = Scene.from_dict(truth["scene"])
            assert parse(image) == Scene(expected.objects, expected.background)  # parse reads no word
        elif kind == "truncated":
            with pytest.raises(OSError):
                _open(data)
        elif kind == "not_image":
            assert data.lstrip().lower().startswith(b"<!doctype html") and path.suffix == ".jpg"
        elif kind == "tiny":
            assert _open(data).size == (24, 24)
        elif kind == "extreme_aspect":
            w, h = _open(data).size
            assert max(w / h, h / w) >= 4
        elif kind == "near_blank":
            assert np.asarray(_open(data)).std() < 3
        elif kind == "blurred":
            edges = np.abs(np.diff(np.asarray(_open(data).convert("L")).astype(int), axis=1)).max()
            assert edges < 20
        elif kind == "bomb":
            assert len(data) < 1_000_000 and path.suffix == ".png"
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(data))
            assert int.from_bytes(data[16:20], "big") == BOMB_SIDE
        elif kind in ("exact_duplicate", "near_duplicate"):
            source = table.iloc[int(row.source)]
            assert source.fault is None and int(row.source) < row.Index
            original = (web_dir / source.url.split("127.0.0.1:8000/")[1]).read_bytes()
            same = hashlib.sha256(data).digest() == hashlib.sha256(original).digest()
            assert same == (kind == "exact_duplicate")
            if kind == "near_duplicate":
                assert _open(data).size == (60, 60)
        if kind in ("optout", "not_image"):
            assert serve["/" + path.relative_to(web_dir).as_posix()]["headers"]


def test_render_dataset_is_deterministic(tmp_path):
    cfg = ScenesConfig(n=12, size=32, seed=9, faults=0.5, base_url="http://localhost:9/x/")
    for out in (tmp_path / "a", tmp_path / "b"):
        render_dataset(cfg, out)
    a, b = (pd.read_parquet(tmp_path / d / "urls.parquet") for d in "ab")
    pd.testing.assert_frame_equal(a, b)
    assert a["url"].str.startswith("http://localhost:9/x/images/").all()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


@pytest.mark.parametrize("n,fraction", [(10, 0.0), (10, 0.3), (25, 1.0), (200, 0.1), (7, 1.0)])
def test_assign_faults_counts_and_sources(n, fraction):
    rows = assign_faults(n, fraction, random.Random(0))
    faulty = [k for k in rows if k is not None]
    assert len(rows) == n and len(faulty) == round(n * fraction)
    if len(faulty) >= len(FAULT_KINDS) and any(k in (None, "optout") for k in rows):
        assert set(faulty) == set(FAULT_KINDS)
    for i, kind in enumerate(rows):
        if kind in ("exact_duplicate", "near_duplicate"):
            assert any(k in (None, "optout") for k in rows[:i])


def test_a_rich_world_dataset(tmp_path):
    cfg = ScenesConfig(n=12, size=64, seed=1, faults=0.0, world="rich")
    assert cfg.word_prob == 0.6 and ScenesConfig(world="rich", word_prob=0.0).word_prob == 0.0
    assert "world" not in ScenesConfig().model_dump() and ScenesConfig.model_validate(cfg.model_dump()) == cfg
    render_dataset(cfg, tmp_path)
    truths = [json.loads(p.read_text()) for p in sorted((tmp_path / "scenes").glob("*.json"))]
    scenes = [Scene.from_dict(t["scene"]) for t in truths]
    assert len(scenes) == 12 and all(s.world == "rich" for s in scenes)
    assert any(s.frame for s in scenes) and any(o.fill == "hollow" for s in scenes for o in s.objects)
    for truth, scene in zip(truths, scenes):
        image = Image.open(tmp_path / "images" / f"{truth['scene_id']}.jpg")
        assert parse(image, world="rich") == scene
