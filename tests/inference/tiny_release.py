"""A complete tiny Lens release on disk, in the released layout, made by lensforge's own writers: model_index.json,
transformer/ (config.json with the released fields + sharded safetensors + index), vae/ (a FLUX.2 VAE), text_encoder/
+ tokenizer/ (a GPT-OSS with a harmony chat template whose prefix is Lens's 97 tokens), scheduler/ (the release's
scheduler_config.json).

    root = save_tiny_release(tmp_path / "lens")            # then: lensforge generate --checkpoint root ...
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from inference.config import ModelConfig
from inference.lens_format import RELEASE_CONFIGS, write_transformer_dir
from inference.mmdit import MMDiT
from tests.inference.tiny_models import save_tiny_lens_release

LAYERS = (1, 4, 9, 23)
# 4 blocks × 48 (3 heads × 16), 32 VAE channels in 2×2 patches, GPT-OSS's 32-wide features from 4 layers.
TINY_LENS = ModelConfig(name="tiny-lens", depth=4, hidden=48, heads=3, head_dim=16, in_channels=32, patch=2,
                        text_dim=32, text_layers=4, rope_axes=(4, 6, 6), base_size=64)


def random_denoiser(cfg: ModelConfig = TINY_LENS, seed: int = 0, std: float = 0.05) -> MMDiT:
    """An MMDiT whose every weight is perturbed, so that no block is the adaLN-zero identity."""
    torch.manual_seed(seed)
    model = MMDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def save_tiny_release(out, seed: int = 0, dtype: torch.dtype = torch.float32, shard_size: str = "200KB",
                      vae=None) -> Path:
    """The release root at `out`; the transformer is `random_denoiser(seed=seed)` in `dtype`, sharded."""
    out = Path(out)
    save_tiny_lens_release(out, layers=LAYERS, vae=vae)
    shutil.rmtree(out / "transformer")
    state = {k: v.to(dtype) for k, v in random_denoiser(seed=seed).state_dict().items()}
    write_transformer_dir(state, TINY_LENS, out / "transformer", LAYERS, max_shard_size=shard_size)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy(RELEASE_CONFIGS / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    return out
