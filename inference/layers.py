"""Building blocks of the MMDiT: RMSNorm, SwiGLU, 3-axis RoPE, the timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; `shape` may be (..., D) to hold several weight rows (e.g. one per text layer)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight).type_as(x)


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weightless RMSNorm over the last dim, computed in fp32 (bf16 autocast keeps the statistics exact)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) · w3 x), no bias; w1 and w3 are one matmul (`w13`)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) · (1 + scale) + shift, with shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding over three axes (frame, h, w); Lens: (8, 28, 28) channels of a 64-wide head.


def rope_positions(h: int, w: int, text_len: int, device=None) -> torch.Tensor:
    """Positions (h·w + text_len, 3) for the joint sequence [image; text].

    Image tokens are centred on the grid's middle (row-major; frame 0), so a 1:2 and a 2:1 image share their
    centre. Text tokens continue past the largest image coordinate on all three axes, one step per token (as
    Qwen-Image's MSRoPE), so text never collides with an image position whatever the size.
    """
    ys = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)  # (N, 2)
    image = torch.cat([torch.zeros(h * w, 1, device=device), grid], dim=1)  # (N, 3)
    start = max(h - 1, w - 1) / 2 + 1
    text = (start + torch.arange(text_len, device=device, dtype=torch.float32))[:, None].expand(text_len, 3)
    return torch.cat([image, text], dim=0)


def rope_freqs(pos: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """Unit complex rotations (T, head_dim/2) for positions (T, n_axes); axis i rotates axes[i] channels."""
    angles = []
    for i, dim in enumerate(axes):
        freqs = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(pos[:, i, None].double() * freqs)
    angle = torch.cat(angles, dim=-1).float()  # (T, head_dim/2)
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, T, H, Dh) by freqs (T, Dh/2), as complex products in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, Dh/2)
    return torch.view_as_real(pairs * freqs[:, None]).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Timestep embedding: sinusoidal (256) → MLP, the only adaLN input (Lens has no pooled text vector).


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of t ∈ [0, 1] (scaled by 1000, as DiT's integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) → (B, D)
        features = timestep_features(t, self.freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))
