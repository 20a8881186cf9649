"""Building blocks of the Lens MMDiT: RMSNorm, the gated MLP, adaLN modulation, 3-axis RoPE, timestep embedding.

Each one computes exactly what the released model's code computes (diffusers PR #13837 and the diffusers layers it
uses), operation for operation, so that the released weights give the same numbers here as there; the tests
compare them with diffusers' own `RMSNorm`, `AdaLayerNormContinuous`, `Timesteps` and `TimestepEmbedding`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10_000  # Lens's RoPE base (fixed in the released class)
TIMESTEP_DIM = 256  # sinusoidal features before the timestep MLP
BLOCK_EPS = 1e-6  # block norms, QK norms, final LayerNorm
TEXT_EPS = 1e-5  # the per-layer text-feature norms `txt_norm.{i}`


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight; statistics in fp32.

    As diffusers' RMSNorm: x · rsqrt(mean(x²) + eps) is formed in fp32, cast to the weight's dtype when that is
    half precision, then multiplied by the weight (so a bf16 model returns bf16, an fp32 weight under autocast
    returns fp32)."""

    def __init__(self, dim: int, eps: float = BLOCK_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class GateMLP(nn.Module):
    """SwiGLU without bias: w2(silu(w1 x) · w3 x). Lens: width int(D / 3 · 8) (4096 at D = 1536)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)
        self.w3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x: torch.Tensor, mods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """adaLN: x (B, T, D), mods (B, 3D) = (shift, scale, gate) → x · (1 + scale) + shift, and gate (B, 1, D)."""
    shift, scale, gate = mods.chunk(3, dim=-1)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), gate.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding over three axes (frame, h, w); Lens: (8, 28, 28) channels of a 64-wide head.


def rope_positions(h: int, w: int, text_len: int, device=None) -> torch.Tensor:
    """Integer positions (h·w + text_len, 3) of the joint sequence [image; text], as Lens's `scale_rope`.

    Image rows run −(h − h//2) … h//2 − 1 (row-major, so a centred grid: 4 rows → −2, −1, 0, 1; 3 rows → −2, −1,
    0), columns alike, frame 0. Text token j sits at max(h//2, w//2) + j on all three axes, past the image."""
    rows = torch.arange(h, device=device) - (h - h // 2)
    cols = torch.arange(w, device=device) - (w - w // 2)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)  # (N, 2)
    image = torch.cat([torch.zeros(h * w, 1, dtype=grid.dtype, device=device), grid], dim=1)  # (N, 3)
    text = (max(h // 2, w // 2) + torch.arange(text_len, device=device))[:, None].expand(text_len, 3)
    return torch.cat([image, text], dim=0)


def rope_freqs(pos: torch.Tensor, axes: tuple[int, ...], theta: float = ROPE_THETA) -> torch.Tensor:
    """Unit complex rotations (T, head_dim/2) for integer positions (T, n_axes); axis i turns axes[i] channels.

    Angles are position × inverse frequency in fp32, the frequencies formed as the released class forms them."""
    angles = []
    for i, dim in enumerate(axes):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=pos.device).float().div(dim))  # (dim/2,)
        angles.append(pos[:, i, None].float() * inv_freq[None, :])
    angle = torch.cat(angles, dim=-1)  # (T, head_dim/2)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, T, H, Dh) by freqs (T, Dh/2), as complex products in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))  # (B, T, H, Dh/2)
    return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(3).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding: sinusoidal (256) → MLP, the only adaLN input (Lens has no pooled text vector).


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_DIM, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) = [cos, sin] of 1000·t·freqs, t ∈ [0, 1] (diffusers' `Timesteps` with
    flip_sin_to_cos, no frequency shift, scale 1000; the same operations in the same order)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = 1000 * (t[:, None].float() * freqs[None, :])  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """features → linear_1 → SiLU → linear_2 (names as the release's `time_text_embed.timestep_embedder`)."""

    def __init__(self, hidden: int, freq_dim: int = TIMESTEP_DIM):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, hidden)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class TimeEmbed(nn.Module):
    """t (B,) → (B, D); `t` is first cast to the stream's dtype, as the released model does (bf16 in bf16)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(hidden)

    def forward(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t.to(like.dtype))
        return self.timestep_embedder(features.to(like.dtype))


class AdaLayerNormOut(nn.Module):
    """The final layer's norm: LayerNorm without affine (eps 1e-6), modulated by (scale, shift) from SiLU(temb);
    the release's `norm_out` (diffusers' AdaLayerNormContinuous, elementwise_affine=False)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 2 * hidden)
        self.norm = nn.LayerNorm(hidden, eps=BLOCK_EPS, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
