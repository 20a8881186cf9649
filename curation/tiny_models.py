"""Tiny randomly initialised model-filter weights, for tests and benchmarks only (never used by a real run).

They are written to disk and read back through exactly the code path of real weights (`load_clip`, `load_head`,
`ClipScorer`), so a test exercises what a user's run does, offline:

    models_cfg = ModelFiltersConfig(**write_tiny_clip(tmp_path))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from curation.model_filters import AestheticHead, ProbeHead

TINY_CLIP_NAME = "lensforge-tiny-clip"
# A ViT-B-style CLIP shrunk to ~3.5 M parameters, nearly all in the token embedding (the standard 49408-token BPE
# vocabulary, whose file ships inside open_clip: no download). Embeddings are 32-d.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# NSFW as a one-hidden-layer MLP and watermark as a linear probe, so both ProbeHead shapes are exercised.
TINY_NSFW_DIMS = (32, 16, 1)
TINY_WATERMARK_DIMS = (32, 1)


def write_tiny_clip(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """Writes the tiny CLIP's config JSON, its weights and three tiny heads under `directory`.
    Returns ModelFiltersConfig fields: clip_model, clip_weights, aesthetic_head, nsfw_head, watermark_head."""
    import open_clip

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    paths = {
        "clip_model": str(config_path),
        "clip_weights": str(out / "tiny_clip.safetensors"),
        "aesthetic_head": str(out / "aesthetic.safetensors"),
        "nsfw_head": str(out / "nsfw.safetensors"),
        "watermark_head": str(out / "watermark.safetensors"),
    }
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        modules = {
            "clip_weights": open_clip.create_model(TINY_CLIP_NAME),
            "aesthetic_head": AestheticHead(TINY_CLIP_CONFIG["embed_dim"]),
            "nsfw_head": ProbeHead(TINY_NSFW_DIMS),
            "watermark_head": ProbeHead(TINY_WATERMARK_DIMS),
        }
    for field, module in modules.items():
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, paths[field])
    return paths
