"""Rectified flow, the one object that training and sampling share (minRF's `rf.py`: never copy it).

    flow = RectifiedFlow(prediction=cfg.prediction)
    loss = flow.loss(model, x0, text, text_mask).mean()                      # training
    x0 = flow.sample(model, noise, text, mask, steps=20, cfg=5.0, neg=(neg_text, neg_mask))   # sampling

Convention: x_t = (1 − t)·x0 + t·ε, t = σ ∈ [0, 1], t = 1 is pure noise; the velocity is v = ε − x0, so sampling
integrates dx/dt = v from t = 1 down to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

# Lens: logit-normal training timesteps shifted by μ = 1.0 at 256 image tokens → 1.3 at 4096, linear in between.
LENS_MU = ((256, 1.0), (4096, 1.3))

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def lens_mu(image_tokens: int) -> float:
    """Training shift μ for an image of `image_tokens` tokens (linear through Lens's two points)."""
    (n0, mu0), (n1, mu1) = LENS_MU
    return mu0 + (mu1 - mu0) * (image_tokens - n0) / (n1 - n0)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """Sampling shift μ: FLUX.2's empirical fit in token count and steps (diffusers `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333  # μ at 10 steps = a1·n + b1
    a2, b2 = 0.00016927, 0.45666666  # μ at 200 steps = a2·n + b2
    if image_tokens > 4300:
        return a2 * image_tokens + b2
    m200, m10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    slope = (m200 - m10) / 190.0
    return slope * steps + (m200 - 200.0 * slope)


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """e^μ·t / (e^μ·t + 1 − t): more steps near noise as μ grows; maps 0 → 0 and 1 → 1.

    Applied to t = sigmoid(n) it gives sigmoid(n + μ), so training's shifted logit-normal and sampling's shifted
    schedule are the same map.
    """
    e = math.exp(mu)
    return e * t / (e * t + 1 - t)


def sigma_schedule(steps: int, image_tokens: int, mu: float | None = None) -> torch.Tensor:
    """(steps + 1,) decreasing σ from 1 to 0: FLUX.2's linspace(1, 1/steps) shifted by μ, then a final 0.

    Computed as the Lens pipeline's scheduler computes it (FlowMatchEulerDiscreteScheduler with exponential
    dynamic shifting): the linspace cast to float32, then e^μ / (e^μ + 1/σ − 1) in float32."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    mu = empirical_mu(image_tokens, steps) if mu is None else mu
    e = np.float32(math.exp(mu))
    base = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    sigmas = torch.from_numpy(e / (e + (np.float32(1) / base - np.float32(1))))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


NOISE_LAYOUTS = ("latent", "tokens")


def initial_noise(shape: tuple[int, ...], seeds: list[int], device=None, layout: str = "latent", patch: int = 1,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) Gaussian noise, sample i drawn from its own CPU generator seeded seeds[i]: the same image for
    the same seed whatever the batch it lands in or the device it runs on.

    layout "latent" draws (C, H, W) directly; "tokens" draws (1, H/p·W/p, C·p²) in `dtype` and unpacks it, as the
    Lens pipeline draws its latents: with `torch.Generator().manual_seed(seed)` there, the same seed gives the same
    noise here."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    if layout not in NOISE_LAYOUTS:
        raise ValueError(f"noise layout {layout!r} is not one of {', '.join(NOISE_LAYOUTS)}")
    c, hh, ww = shape[1:]
    noise = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        if layout == "latent":
            noise.append(torch.randn((c, hh, ww), generator=g, dtype=dtype))
        else:
            h, w = hh // patch, ww // patch
            tokens = torch.randn((1, h * w, c * patch * patch), generator=g, dtype=dtype)
            noise.append(tokens.reshape(h, w, c, patch, patch).permute(2, 0, 3, 1, 4)
                         .reshape(c, hh, ww))  # inference/mmdit.py's unpatchify
    return torch.stack(noise).to(device)


def pad_text(features: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate text batches along B, right-padding to the longest: (B_i, L_i, D) → (ΣB, max L, D)."""
    length = max(f.shape[1] for f in features)
    feats = [torch.nn.functional.pad(f, (0, 0, 0, length - f.shape[1])) for f in features]
    masks = [torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False) for m in masks]
    return torch.cat(feats), torch.cat(masks)


def model_patch(model) -> int:
    """The denoiser's patch size, through DDP (`.module`) and torch.compile (`._orig_mod`) wrappers; 1 if unknown."""
    for attr in ("module", "_orig_mod"):
        model = getattr(model, attr, model)
    return getattr(getattr(model, "config", None), "patch", 1)


def per_token_norm(v: torch.Tensor, patch: int) -> torch.Tensor:
    """‖v‖ over each model token (C·p·p values, in the token's own order), as (B, N, 1)."""
    b, c, hh, ww = v.shape
    tokens = v.view(b, c, hh // patch, patch, ww // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, -1, c * patch * patch).norm(dim=-1, keepdim=True)


def token_scale(scale: torch.Tensor, like: torch.Tensor, patch: int) -> torch.Tensor:
    """A per-token factor (B, N, 1) broadcast back to the latent layout (B, 1, H, W)."""
    b, _, hh, ww = like.shape
    grid = scale.view(b, 1, hh // patch, ww // patch)
    return grid.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def check_guidance(cfg: float, mu: float | None = None) -> None:
    """Refuse a guidance scale that is not a finite number ≥ 0, or a non-finite shift: either turns every latent
    into NaN, and the image comes out black without an error."""
    if not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"guidance scale (cfg) {cfg}: must be a finite number ≥ 0 (1 = no guidance)")
    if mu is not None and not math.isfinite(mu):
        raise ValueError(f"schedule shift mu {mu}: must be a finite number")


@dataclass(frozen=True)
class RectifiedFlow:
    prediction: Literal["velocity", "x"] = "velocity"
    t_min: float = 0.05  # x-prediction divides by t; clamp it (CPU-RECIPES.md's working row)

    # -- training ---------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, image_tokens: int, generator=None, device=None) -> torch.Tensor:
        """(B,) logit-normal t with Lens's resolution-dependent shift: sigmoid(N(0, 1) + μ(tokens))."""
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(n + lens_mu(image_tokens))

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as a velocity (identity for velocity prediction)."""
        if self.prediction == "velocity":
            return out
        t = t.clamp(min=self.t_min).view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - out) / t  # x_t − x0 = t·(ε − x0)

    def loss(self, model: Model, x0, text, text_mask, t=None, noise=None, generator=None) -> torch.Tensor:
        """(B,) mean squared velocity error; x0 (B, C, H, W) normalized latents. Caption dropout is the caller's
        (an empty prompt: text with no valid token)."""
        b = x0.shape[0]
        if t is None:
            tokens = x0.shape[-2] * x0.shape[-1] // model_patch(model) ** 2
            t = self.sample_t(b, tokens, generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tt = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - tt) * x0 + tt * noise
        v = self.velocity(model(x_t, t, text, text_mask), x_t, t)
        return (v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)

    # -- sampling ---------------------------------------------------------------------------------------------
    def guided_velocity(self, model: Model, x, t, cond, neg, cfg: float, patch: int) -> torch.Tensor:
        """CFG v = v_neg + cfg·(v_cond − v_neg), rescaled per token to ‖v_cond‖ (a token whose combined norm is 0
        keeps it); both halves in one batch, conditional first, as the Lens pipeline."""
        if neg is None or cfg == 1.0:
            return self.velocity(model(x, t, *cond), x, t)
        text, mask = pad_text([cond[0], neg[0]], [cond[1], neg[1]])
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        v_cond, v_neg = self.velocity(model(x2, t2, text, mask), x2, t2).chunk(2)
        v = v_neg + cfg * (v_cond - v_neg)
        cond_norm, norm = per_token_norm(v_cond, patch), per_token_norm(v, patch)
        scale = torch.where(norm > 0, cond_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
        return v * token_scale(scale, v, patch)

    @torch.no_grad()
    def sample(self, model: Model, noise, text, text_mask, steps: int = 20, cfg: float = 1.0, neg=None,
               mu: float | None = None, patch: int | None = None,
               on_step: Callable[[], object] | None = None) -> torch.Tensor:
        """Euler from noise (B, C, H, W) at t = 1 to x0 on the shifted σ schedule.

        text (B, L, D) / text_mask (B, L) condition; neg = (features, mask) of the negative prompt(s), batch B
        or 1 (an empty prompt: (1, 0, D) features), used when cfg ≠ 1. Each step is the Lens pipeline's: the
        model sees t = (1000·σ)/1000 (its scheduler's timestep, in x's dtype), then x ← x + (σ' − σ)·v in float32,
        stored back in x's dtype (the model's in the pipeline; fp32 under autocast). `on_step` is called after
        every step (a progress bar's update).
        """
        check_guidance(cfg, mu)
        patch = patch or model_patch(model)
        b = noise.shape[0]
        if neg is not None and neg[0].shape[0] == 1 and b > 1:
            neg = (neg[0].expand(b, -1, -1), neg[1].expand(b, -1))
        tokens = noise.shape[-2] * noise.shape[-1] // patch**2
        sigmas = sigma_schedule(steps, tokens, mu).to(noise.device)
        x = noise
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(b).to(x.dtype) / 1000
            v = self.guided_velocity(model, x, t, (text, text_mask), neg, cfg, patch)
            step = x.to(torch.promote_types(x.dtype, torch.float32)) + (sigmas[i + 1] - sigmas[i]) * v
            x = step.to(x.dtype)  # x keeps its dtype (the model's; fp32 under autocast)
            if on_step is not None:
                on_step()
        return x
