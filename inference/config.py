"""Model sizes by name. `lens-3.8b` is Lens as published; `small` and `tiny` are the same architecture for CPUs.

Every preset is a released `LensTransformer2DModel` config with other sizes (`inference/lens_format.py` converts
both ways); RoPE θ, the timestep features, the norms' eps and the MLP width rule are the released class's constants
(`inference/layers.py`), not settings.

    lensforge models            # every preset with its parameter count
    cfg = get_preset("tiny")    # a ModelConfig; `cfg.model_copy(update={...})` for variations
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Everything that decides the denoiser's shapes. Travels with the weights (see `checkpoint.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    depth: int = Field(ge=1, description="dual-stream MMDiT blocks")
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    head_dim: int = Field(ge=2)
    in_channels: int = Field(ge=1, description="latent channels the codec gives (FLUX.2: 32)")
    patch: int = Field(ge=1, description="square patch over the latent; one token = in_channels·patch² values")
    text_dim: int = Field(ge=1, description="width of one text-feature layer (GPT-OSS-20B: 2880)")
    text_layers: int = Field(ge=1, description="text-feature layers concatenated by the encoder (Lens: 4)")
    rope_axes: tuple[int, int, int] = Field(description="RoPE channels per axis (frame, h, w); sums to head_dim")
    prediction: Literal["velocity", "x"] = Field("velocity", description="what the network outputs (see flow.py)")
    base_size: int = Field(1024, ge=16, description="image side the preset is trained at; default for generate")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(f"heads × head_dim = {self.heads * self.head_dim} ≠ hidden {self.hidden}")
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")
        return self

    @property
    def token_channels(self) -> int:
        """Values per image token: the released config's `in_channels` (Lens: 32 · 2² = 128)."""
        return self.in_channels * self.patch * self.patch

    @property
    def mlp(self) -> int:
        """Gated-MLP width, derived as the released class derives it: int(hidden / 3 · 8)."""
        return int(self.hidden / 3 * 8)


PRESETS: dict[str, ModelConfig] = {
    # Lens: 48 blocks × 1536, 24 heads × 64, SwiGLU int(1536 / 3 · 8) = 4096, GPT-OSS-20B layers 5/11/17/23 (4 × 2880),
    # patch 2 over the FLUX.2 VAE's 32 channels (1024² → 4096 tokens).
    "lens-3.8b": ModelConfig(
        name="lens-3.8b", depth=48, hidden=1536, heads=24, head_dim=64, in_channels=32, patch=2,
        text_dim=2880, text_layers=4, rope_axes=(8, 28, 28), base_size=1024,
    ),
    # CPU bench / small demo: pixel codec (unshuffle 4 → 48 channels), MiniLM features (2 × 384), 64² → 256 tokens.
    "small": ModelConfig(
        name="small", depth=8, hidden=384, heads=6, head_dim=64, in_channels=48, patch=1,
        text_dim=384, text_layers=2, rope_axes=(8, 28, 28), base_size=64,
    ),
    # CPU-RECIPES.md's working row: width 128, 4 blocks, 4 heads, 32² images → 64 tokens of 4×4×3 values;
    # SwiGLU int(128 / 3 · 8) = 341.
    "tiny": ModelConfig(
        name="tiny", depth=4, hidden=128, heads=4, head_dim=32, in_channels=48, patch=1,
        text_dim=384, text_layers=2, rope_axes=(4, 14, 14), base_size=32,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LookupError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_models() -> list[str]:
    return list(PRESETS)
