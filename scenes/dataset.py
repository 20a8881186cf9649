"""Render a URL list of synthetic scenes with web faults mixed in: the demo's and the tests' stand-in for the web.

    lensforge scenes render --n 2000 --out data/web --faults 0.1
    lensforge scenes render --n 2000 --out data/rich --set scenes.world=rich     # the rich world
    lensforge serve-web data/web --port 8000

Writes, under OUT:
    images/<name>          normal images: JPEG q90 at size²; faulty ones as described in faults.py
    scenes/<name>.json     {"scene_id", "fault", "source", "scene": Scene.to_dict() or null if the file shows none}
    urls.parquet           url, caption (weak alt text), fault (null or kind), source (row of the original, for
                           duplicates), scene_id
    _serve.json            per-path server behaviour, e.g. {"/images/000007.jpg": {"headers": {"X-Robots-Tag": "noai"}}}
Everything follows from the config (seed included): the same config writes the same bytes.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from scenes import faults
from scenes.config import ScenesConfig
from scenes.describe import alt
from scenes.render import render
from scenes.scene import Scene, pick, random_scene

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def assign_faults(n: int, fraction: float, rng: random.Random) -> list[str | None]:
    """Per row, None or a fault kind: exactly round(n * fraction) faults, every kind once before any repeats, and
    each duplicate after at least one row whose image is a plain render (its source; fault-free if any exists)."""
    count = round(n * fraction)
    kinds = list(faults.FAULT_KINDS) * (count // len(faults.FAULT_KINDS))
    kinds += rng.sample(faults.FAULT_KINDS, count % len(faults.FAULT_KINDS))
    rows: list[str | None] = [None] * (n - count) + kinds
    rng.shuffle(rows)
    sources = [i for i, kind in enumerate(rows) if kind is None] or [i for i, k in enumerate(rows) if k == "optout"]
    if not sources:  # too few rows for any normal image: a duplicate has nothing to copy
        return ["broken_link" if kind in faults.DUPLICATE_KINDS else kind for kind in rows]
    first = sources[0]
    for i in range(first):  # move duplicates that come before the first normal image behind it
        if rows[i] in faults.DUPLICATE_KINDS:
            rows[i], rows[first] = rows[first], rows[i]
            first = i
    return rows


def _write(out: Path, name: str, data: bytes | None) -> None:
    if data is not None:
        (out / "images" / name).write_bytes(data)


def render_dataset(cfg: ScenesConfig, out: Path | str) -> Path:
    """Write images, ground truth, `urls.parquet` and `_serve.json` under `out`; returns the parquet's path."""
    if cfg.min_objects > cfg.max_objects:
        raise ValueError(f"scenes.min_objects ({cfg.min_objects}) > scenes.max_objects ({cfg.max_objects})")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    kinds = assign_faults(cfg.n, cfg.faults, random.Random(f"faults-{cfg.seed}"))
    base_url = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/")
    rows, serve = [], {}
    normal: dict[int, tuple[Image.Image, str, Scene]] = {}  # earlier rows whose file is a plain render
    for i, kind in enumerate(kinds):
        scene = random_scene(rng, cfg.min_objects, cfg.max_objects, cfg.word_prob, world=cfg.world)
        image = render(scene, cfg.size)
        source, shows_scene, ext, data = None, True, "jpg", None
        if kind in faults.DUPLICATE_KINDS:  # a copy of an earlier normal image, showing that row's scene
            # Prefer a fault-free source; an opt-out render only when there is none (faults = 1.0).
            source = pick(rng, [j for j in sorted(normal) if kinds[j] is None] or sorted(normal))
            src_image, src_name, scene = normal[source]
            if kind == "exact_duplicate":
                data = (out / "images" / src_name).read_bytes()
            else:
                data = faults.near_duplicate_of(src_image)
        elif kind is not None:
            fault = faults.MAKERS[kind](scene, image, rng)
            data, ext, shows_scene = fault.data, fault.ext, fault.shows_scene
            if fault.serve:
                serve[f"/images/{i:06d}.{ext}"] = fault.serve
        else:
            data = faults.jpeg(image)
        name = f"{i:06d}.{ext}"
        _write(out, name, data)
        if kind in (None, "optout"):
            normal[i] = (image, name, scene)
        truth = {"scene_id": f"{i:06d}", "fault": kind, "source": source,
                 "scene": scene.to_dict() if shows_scene else None}
        (out / "scenes" / f"{i:06d}.json").write_text(json.dumps(truth))
        rows.append({"url": f"{base_url}/images/{name}", "caption": alt(scene, rng), "fault": kind,
                     "source": source, "scene_id": f"{i:06d}"})
    (out / "_serve.json").write_text(json.dumps(serve, indent=1, sort_keys=True))
    table = pd.DataFrame(rows).astype({"source": "Int64"})
    table.to_parquet(out / "urls.parquet", index=False)
    return out / "urls.parquet"


def fault_counts(urls: Path | str) -> Counter:
    """Rows per fault kind ('normal' for rows without one), for the CLI's summary."""
    table = pd.read_parquet(urls, columns=["fault"])
    return Counter(k if isinstance(k, str) else "normal" for k in table["fault"])
