"""training/rl_losses.py on known inputs: DiffusionNFT's normalised rewards and the direction of its update."""

import pytest
import torch

from training.distill_losses import adaptive_weight, noised, per_sample, x0_from_v
from training.rl_losses import flat_prompts, kl_to_reference, nft_loss, optimality


def test_rewards_are_centred_per_prompt_clipped_and_flat_prompts_get_one_half():
    raw = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2])  # two prompts, four rollouts each
    r, z = optimality(raw, groups)
    assert z == pytest.approx(0.5 / 2**0.5)  # the centred rewards ±0.5 on half the batch, 0 on the rest
    torch.testing.assert_close(r[4:], torch.full((4,), 0.5))  # no variance, no signal
    torch.testing.assert_close(r[:4], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # ±0.5 / 0.354 clips to ±1
    r, _ = optimality(raw, groups, z=2.0)
    torch.testing.assert_close(r[:4], torch.tensor([0.625, 0.375, 0.625, 0.375]))  # ½ + ½ · (±0.5 / 2)
    assert optimality(torch.zeros(3), torch.tensor([0, 0, 1]))[0].tolist() == [0.5] * 3  # Z floored, not 0 / 0
    assert flat_prompts(raw, groups) == 0.5 and flat_prompts(raw, torch.arange(8)) == 1.0


def setup(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 6, 6, generator=g)
    eps = torch.randn(b, 4, 6, 6, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    v_old = torch.randn(b, 4, 6, 6, generator=g)
    return x0, noised(x0, t, eps), t, v_old


def grad_at_old(r, beta, seed=0):
    """The loss gradient in v_new at v_new = v_old (where every NFT iteration starts)."""
    x0, x_t, t, v_old = setup(seed)
    v_new = v_old.clone().requires_grad_(True)
    nft_loss(v_new, v_old, x_t, t, x0, torch.full((3,), r), beta).sum().backward()
    return v_new.grad


def flow_matching_grad(seed=0):
    """The gradient of the (adaptively weighted) flow-matching loss on the rollouts, at v_old."""
    x0, x_t, t, v_old = setup(seed)
    v = v_old.clone().requires_grad_(True)
    pred = x0_from_v(x_t, t, v)
    per_sample((pred - x0) ** 2 / adaptive_weight(pred, x0)).sum().backward()
    return v.grad


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_the_update_is_flow_matching_on_good_rollouts_and_its_opposite_on_bad_ones(beta):
    fm = flow_matching_grad()
    assert fm.abs().max() > 0
    torch.testing.assert_close(grad_at_old(1.0, beta), fm)  # r = 1: plain flow matching on the rollout
    torch.testing.assert_close(grad_at_old(0.0, beta), -fm)  # r = 0: away from it
    torch.testing.assert_close(grad_at_old(0.5, beta), torch.zeros_like(fm), atol=1e-6, rtol=0)  # r = ½: nothing
    torch.testing.assert_close(grad_at_old(0.75, beta), 0.5 * fm)  # (2r − 1) in between


def test_nft_loss_never_trains_the_old_policy_and_the_kl_is_zero_at_the_reference():
    x0, x_t, t, v_old = setup()
    v_old = v_old.clone().requires_grad_(True)
    v_new = torch.zeros_like(x0, requires_grad=True)
    nft_loss(v_new, v_old, x_t, t, x0, torch.rand(3), 1.0).sum().backward()
    assert v_old.grad is None and v_new.grad is not None
    assert kl_to_reference(v_old.detach(), v_old.detach()).abs().max() == 0
    ref = torch.randn_like(x0)
    torch.testing.assert_close(kl_to_reference(ref + 2.0, ref), torch.full((3,), 4.0))
