"""The loss terms of Lens-Turbo's distillation (issue 16): DMD2 with the decoupled CFG term, the fake score's own
flow loss, and the adversarial branch with an approximate R1 penalty. Pure functions on tensors, no models: the
distill loop (to come) calls the teacher, fake score and discriminator and hands their outputs here, so every term
is tested on known inputs and can be weighted, logged and switched off on its own.

Convention (inference/flow.py): x_t = (1 − t)·x0 + t·ε, the models predict v = ε − x0, so x̂0 = x_t − t·v.
Shapes: images (B, C, H, W), t (B,); every loss returns (B,) per sample, the caller takes the mean.

    x_t = noised(x0_gen, t, eps)
    dm, ca = decoupled_dmd(x0_gen, x_t, t, v_fake, v_cond, v_uncond, guidance=5.0)  # DMD2 + decoupled CFG term
    fake = flow.loss(fake_score, x0_gen.detach(), text, mask, t=t, noise=eps)      # the fake score tracks G
    d_real, d_fake, d_near = disc(torch.cat([x_real, x_fake, perturbed(x_real, alpha=0.1)])).chunk(3)
    d = discriminator_loss(d_real, d_fake) + approx_r1(d_real, d_near, gamma=1.0)
    g = generator_gan_loss(d_fake)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6  # floor of DMD's per-sample normaliser (a generated sample equal to the teacher's estimate)


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B,) mean over everything but the batch."""
    return x.flatten(1).mean(dim=1)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * eps


def x0_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_t - _bcast(t, x_t) * v


def _toward(x0_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x0_gen − sg(x0_gen − grad)‖² per sample: its gradient in x0_gen is grad / numel, DMD's update."""
    return 0.5 * per_sample(F.mse_loss(x0_gen, (x0_gen - grad).detach(), reduction="none"))


def adaptive_weight(x0: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """DMD's (and DiffusionNFT's) per-sample weight, broadcastable to x0: the mean |x0 − reference| (x0 detached),
    so that every sample moves at a similar rate whatever its error."""
    return _bcast(per_sample((x0.detach() - reference).abs()).clamp_min(EPS), x0)


def dmd_loss(x0_gen: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_fake: torch.Tensor,
             v_real: torch.Tensor) -> torch.Tensor:
    """DMD2's generator term: pull x0_gen along (x̂0_fake − x̂0_real) / weight, the difference of the two scores
    at x_t. Zero gradient when the fake score equals the real one (the student's distribution is the teacher's)."""
    with torch.no_grad():
        p_real, p_fake = x0_from_v(x_t, t, v_real), x0_from_v(x_t, t, v_fake)
        grad = (p_fake - p_real) / adaptive_weight(x0_gen, p_real)
    return _toward(x0_gen, grad)


def decoupled_dmd(x0_gen: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_fake: torch.Tensor,
                  v_cond: torch.Tensor, v_uncond: torch.Tensor,
                  guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(distribution-matching term, CFG-augmentation term), per sample. DMD against the guided teacher
    v_cfg = v_uncond + w·(v_cond − v_uncond) splits exactly:
    fake − cfg = (fake − cond) − (w − 1)·(cond − uncond).
    The first part matches the conditional teacher; the second is guidance baked into the student. Both share the
    guided teacher's normaliser, so dm + ca has DMD-with-CFG's gradient and either can be weighted or dropped."""
    with torch.no_grad():
        p_cond, p_uncond = x0_from_v(x_t, t, v_cond), x0_from_v(x_t, t, v_uncond)
        p_fake = x0_from_v(x_t, t, v_fake)
        weight = adaptive_weight(x0_gen, p_uncond + guidance * (p_cond - p_uncond))
        dm_grad = (p_fake - p_cond) / weight
        ca_grad = -(guidance - 1) * (p_cond - p_uncond) / weight
    return _toward(x0_gen, dm_grad), _toward(x0_gen, ca_grad)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator, per sample: softplus(−D(real)) + softplus(D(fake))."""
    return per_sample(F.softplus(-real_logits)) + per_sample(F.softplus(fake_logits))


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the student, per sample: softplus(−D(fake))."""
    return per_sample(F.softplus(-fake_logits))


def perturbed(x_real: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + α·ε: the neighbour of a real input that the approximate R1 compares it with."""
    noise = torch.randn(x_real.shape, generator=generator, device=x_real.device, dtype=x_real.dtype)
    return x_real + alpha * noise


def approx_r1(real_logits: torch.Tensor, perturbed_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Approximate R1, per sample: γ·‖D(x) − D(x + α·ε)‖², a finite difference that penalises the
    discriminator's slope at real data without the exact R1's double backward (FSDP and fused attention lack
    it). The caller evaluates D on both in one batch."""
    return gamma * per_sample((real_logits - perturbed_logits) ** 2)
