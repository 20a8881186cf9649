"""A small DATA built directly (no curate, no captioner): manifest, one download tar of rendered scenes cropped to
chosen sizes, and a captions table (scene descriptions, status ok). About a second for a few dozen images."""

import io
import random
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.schema import CAPTIONS_SCHEMA
from curation.manifest import MANIFEST_SCHEMA, make_key
from scenes import alt, describe, random_scene, render


def scene_image(scene, width: int, height: int):
    """The scene rendered at the longer side and centre-cropped to width × height."""
    side = max(width, height)
    im = render(scene, size=side)
    left, top = (side - width) // 2, (side - height) // 2
    return im.crop((left, top, left + width, top + height))


def build_data(root: Path, sizes: list[tuple[int, int]], variants=("dense",), corrupt=(), uncaptioned=(),
               seed: int = 0) -> Path:
    """DATA/{manifest,download,captions}: image i has size sizes[i]; `corrupt` indices get bytes that are no
    image; `uncaptioned` indices get no caption rows."""
    rng = random.Random(seed)
    (root / "download").mkdir(parents=True)
    manifest, captions = [], []
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    with tarfile.open(root / "download" / "00000.tar", "w") as tar:
        for i, (w, h) in enumerate(sizes):
            key, scene = make_key(i), random_scene(rng)
            buf = io.BytesIO()
            scene_image(scene, w, h).save(buf, "JPEG", quality=92)
            raw = b"\xff\xd8\xff\xe0 truncated, not an image" if i in corrupt else buf.getvalue()
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
            manifest.append({"key": key, "url": f"http://127.0.0.1/{key}.jpg", "alt_text": alt(scene, rng),
                             "status": "ok", "width": w, "height": h, "keep": True, "shard": "00000.tar",
                             "member": f"{key}.jpg"})
            if i in uncaptioned:
                continue
            for v in variants:
                captions.append({"key": key, "variant": v, "text": describe(scene, v), "status": "ok",
                                 "model": "scene-parser", "prompt_id": f"{v}@test", "created_at": now})
    (root / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), root / "manifest" / "part-00000.parquet")
    (root / "captions").mkdir()
    pq.write_table(pa.Table.from_pylist(captions, schema=CAPTIONS_SCHEMA), root / "captions" / "part-00000.parquet")
    return root


@pytest.fixture(scope="session")
def data_builder():
    """`build_data` (test modules cannot import conftest under --import-mode=importlib)."""
    return build_data


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray runtime for the module (starting one costs seconds)."""
    import ray

    from common.ray_runtime import init_ray

    init_ray()
    yield
    ray.shutdown()
