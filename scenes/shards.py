"""A training shard set of rendered scenes, written straight in `training/shard_format.py`'s format (no curate, no
captioner, no Ray): `scenes.render` → the `pixel` codec, `scenes.describe` captions → MiniLM features, and the
cache key from training/cache_key.py's `encoders_record`, so the trainer's check sees what a real precompute writes.

    set_dir = write_scene_shards(tmp / "data", {(32, 32): 64, (48, 32): 32})

The tests and the training benchmarks (bench/train.py, bench/finetune.py) build their shard sets with it; it
imports torch, so `scenes/__init__.py` does not import it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import webdataset as wds

from scenes import alt, describe, render
from scenes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, Obj, Scene, random_scene
from training.buckets import BucketTable
from training.caption_variants import split_variant, variant_text
from training.cache_key import encoders_record, table_for
from training.precompute_config import BucketsConfig, PrecomputeConfig
from training.precompute_workers import load_encoders
from training.shard_format import INDEX_FILE, shard_name, shard_set_id, write_encoders, write_sample


# The scenes write_scene_shards draws without a scene_fn, per world.
DEFAULT_SCENES = {
    "basic": lambda rng: random_scene(rng, 1, 2, word_prob=0.0),
    "rich": lambda rng: random_scene(rng, world="rich"),
}


def one_object_scene(rng: random.Random) -> Scene:
    """One large object (any shape, colour, cell) on any background: CPU-RECIPES.md's learnable world."""
    obj = Obj(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), size="large", cell=rng.choice(list(CELLS)))
    return Scene(objects=(obj,), background=rng.choice(list(BACKGROUNDS)))


def scene_image(scene: Scene, width: int, height: int):
    """The scene rendered at the longer side, centre-cropped to width × height."""
    side = max(width, height)
    im = render(scene, size=side)
    left, top = (side - width) // 2, (side - height) // 2
    return im.crop((left, top, left + width, top + height))


def to_tensor(images) -> torch.Tensor:
    """PIL images → (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_caption(scene: Scene, variant: str, rng: random.Random) -> str:
    """`describe(scene, style)`, `alt` (a weak alt text drawn from rng), or either cut to N words (`dense@15`)."""
    base, _ = split_variant(variant)
    return variant_text(alt(scene, rng) if base == "alt" else describe(scene, base), variant)


def precompute_config(buckets: dict[tuple[int, int], int], variants=("dense",), codec: str = "pixel",
                      text_encoder: str = "minilm", multiple: int = 4) -> PrecomputeConfig:
    sides = sorted({round((w * h) ** 0.5) for w, h in buckets})
    ratios = sorted({BucketTable((512,)).nearest_ratio(w, h) for w, h in buckets})
    return PrecomputeConfig(codec=codec, text_encoder=text_encoder, variants=list(variants),
                            buckets=BucketsConfig(base_sides=sides, ratios=ratios, multiple=multiple))


def write_scene_shards(data: str | Path, buckets: dict[tuple[int, int], int], variants=("dense",), seed: int = 0,
                       shard_size: int = 1000, scene_fn=None, encoders_patch: dict | None = None,
                       codec: str = "pixel", text_encoder: str = "minilm", multiple: int = 4,
                       world: str = "basic") -> Path:
    """DATA/shards/<set_id>/ with `buckets[(w, h)]` samples of each size (each must be a bucket of the table the
    sizes imply). Variant `dense`/`short`/... is `describe(scene, variant)`, `alt` an alt text, `dense@15` the dense
    caption cut to 15 words (`scene_caption`). `encoders_patch` overrides fields of
    encoders.json (to make shards that a config must refuse). `codec` / `text_encoder`: other encoders (a tiny
    Lens release's `flux2:ROOT/vae`, `gpt-oss:ROOT`, with `multiple` 16). `world`: the scenes drawn when no
    `scene_fn` is given (basic: 1-2 objects, no word; rich: `random_scene(world="rich")`). Returns the set
    directory."""
    if world not in DEFAULT_SCENES:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(DEFAULT_SCENES)}")
    cfg = precompute_config(buckets, variants, codec, text_encoder, multiple)
    table = table_for(cfg)
    record = encoders_record(cfg, table)
    for section, values in (encoders_patch or {}).items():
        record[section] = {**record[section], **values} if isinstance(values, dict) else values
    set_dir = Path(data) / "shards" / shard_set_id(record)
    write_encoders(set_dir, record)
    codec, encoder = load_encoders(cfg, "cpu")
    rng = random.Random(seed)
    scene_fn = scene_fn or DEFAULT_SCENES[world]
    index, key = [], 0
    for (w, h), count in sorted(buckets.items()):
        bucket = next(b for b in table.buckets if (b.width, b.height) == (w, h))
        scenes = [scene_fn(rng) for _ in range(count)]
        latents = torch.cat([codec.encode(to_tensor([scene_image(s, w, h) for s in scenes[i:i + 256]]))
                             for i in range(0, count, 256)])
        captions = {v: [scene_caption(s, v, random.Random(f"{seed}/{w}x{h}/{i}")) for i, s in enumerate(scenes)]
                    for v in variants}
        feats = {}
        for v, texts in captions.items():
            feats[v] = []
            for i in range(0, count, 256):
                f, m = encoder.encode(texts[i:i + 256])
                feats[v] += [f[j][m[j]] for j in range(len(f))]  # unpadded (L, D)
        for start in range(0, count, shard_size):
            shard = f"{bucket.name}/{shard_name(start // shard_size)}"
            (set_dir / bucket.name).mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(set_dir / shard), encoder=False, mtime=0) as sink:
                for i in range(start, min(start + shard_size, count)):
                    name = f"{key:010d}"
                    key += 1
                    meta = {"key": name, "bucket": bucket.name, "base": bucket.base, "ratio": bucket.ratio,
                            "size": [w, h], "crop": [0, 0, w, h], "upscaled": False, "variants": list(variants),
                            "captions": {v: captions[v][i] for v in variants}, "scene": scenes[i].to_dict()}
                    write_sample(sink, name, latents[i], meta, text={v: feats[v][i] for v in variants})
            index.append({"shard": shard, "bucket": bucket.name, "base": bucket.base, "ratio": bucket.ratio,
                          "samples": min(shard_size, count - start), "bytes": (set_dir / shard).stat().st_size})
    pd.DataFrame(index).to_parquet(set_dir / INDEX_FILE, index=False)
    return set_dir


def cached_scene_shards(tmp_path_factory, name: str, buckets: dict[tuple[int, int], int], **kwargs) -> Path:
    """`write_scene_shards` once per test session and name (DATA directories shared between test modules)."""
    data = tmp_path_factory.getbasetemp() / f"scene-shards-{name}"
    if not (data / "shards").is_dir():
        write_scene_shards(data, buckets, **kwargs)
    return data
