"""The loss terms of Lens-RL's post-training (issue 17): DiffusionNFT's reward normalisation, its negative-aware
flow-matching loss on clean rollouts, and the KL to the frozen reference. Pure functions on tensors, no models,
as training/distill_losses.py: the RL loop calls the current, old and reference models and hands their outputs
here.

Convention (inference/flow.py): x_t = (1 − t)·x0 + t·ε, the models predict v = ε − x0, so x̂0 = x_t − t·v.

    r, z = optimality(raw, groups)                       # (N,) in [0, 1]: ½ + ½·clip((raw − mean_prompt) / Z, −1, 1)
    x_t = noised(x0_rollout, t, eps)
    loss = nft_loss(v_new, v_old, x_t, t, x0_rollout, r, beta=1.0) + kl * kl_to_reference(v_new, v_ref)

DiffusionNFT's two implicit policies mix the current prediction with the one that sampled the rollouts:
v⁺ = β·v_new + (1 − β)·v_old and v⁻ = (1 + β)·v_old − β·v_new. The loss trains v⁺ towards the rollouts with
weight r and v⁻ with weight 1 − r. At v_new = v_old that pulls v_new towards a rollout with r = 1, pushes it away
with r = 0, and leaves it alone with r = ½ (a prompt whose images all scored alike teaches nothing).
"""

from __future__ import annotations

import torch

from training.distill_losses import adaptive_weight, per_sample, x0_from_v

Z_FLOOR = 1e-6  # the normaliser Z when every reward of the batch is its prompt's mean


def centred(raw: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N,) float64: each reward minus the mean reward of its prompt. groups (N,) any integer prompt ids."""
    raw = raw.double()
    ids, index = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=raw.dtype, device=raw.device).index_add_(0, index, raw)
    counts = torch.zeros(len(ids), dtype=raw.dtype, device=raw.device).index_add_(0, index, torch.ones_like(raw))
    return raw - (sums / counts)[index]


def optimality(raw: torch.Tensor, groups: torch.Tensor, z: float | None = None) -> tuple[torch.Tensor, float]:
    """(r, Z): r = ½ + ½·clip((raw − the prompt's mean) / Z, −1, 1) per rollout, r ∈ [0, 1].

    raw (N,) rewards; groups (N,) the prompt each rollout answered (any integer ids). Z is `z` when given (the
    RL loop's, over every rank's rollouts), else the standard deviation of the centred rewards over the batch (the
    scale of one reward's deviation), at least Z_FLOOR."""
    centred_raw = centred(raw, groups)
    scale = float(z) if z is not None else max(float(centred_raw.pow(2).mean().sqrt()), Z_FLOOR)
    return (0.5 + 0.5 * (centred_raw / scale).clamp(-1.0, 1.0)).float(), scale


def flat_prompts(raw: torch.Tensor, groups: torch.Tensor) -> float:
    """The share of prompts whose rollouts all got the same reward (r = ½ for each: no signal)."""
    ids, index = torch.unique(groups, return_inverse=True)
    low = torch.full((len(ids),), float("inf"), dtype=raw.dtype, device=raw.device).scatter_reduce(
        0, index, raw, "amin")
    high = torch.full((len(ids),), float("-inf"), dtype=raw.dtype, device=raw.device).scatter_reduce(
        0, index, raw, "amax")
    return float((low == high).double().mean())


def nft_loss(v_new: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
             r: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) DiffusionNFT's loss: r·‖x̂0(v⁺) − x0‖²/w⁺ + (1 − r)·‖x̂0(v⁻) − x0‖²/w⁻, over β. v_old is the
    sampling policy's prediction (no gradient), x0 the clean rollout, w± the adaptive per-sample weights; the
    1/β keeps the gradient at v_new = v_old the same for any β."""
    v_old = v_old.detach()
    positive = x0_from_v(x_t, t, beta * v_new + (1 - beta) * v_old)
    negative = x0_from_v(x_t, t, (1 + beta) * v_old - beta * v_new)
    pos = per_sample((positive - x0) ** 2 / adaptive_weight(positive, x0))
    neg = per_sample((negative - x0) ** 2 / adaptive_weight(negative, x0))
    return (r * pos + (1 - r) * neg) / beta


def kl_to_reference(v_new: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """(B,) the squared velocity distance to the frozen reference: the KL between the two models' Gaussian
    transitions up to a per-t constant, which the weight (Lens-RL: 1e-4) absorbs."""
    return per_sample((v_new - v_ref.detach()) ** 2)
