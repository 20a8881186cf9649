"""training/distill_losses.py on known inputs: each term's gradient is the update its paper prescribes."""

import torch

from training.distill_losses import (approx_r1, decoupled_dmd, discriminator_loss, dmd_loss, generator_gan_loss,
                                     noised, perturbed, x0_from_v)


def setup(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 6, 6, generator=g).requires_grad_(True)
    eps = torch.randn(b, 4, 6, 6, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    return x0, eps, t, noised(x0.detach(), t, eps), g


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def test_x0_from_v_inverts_noised():
    x0, eps, t, x_t, _ = setup()
    torch.testing.assert_close(x0_from_v(x_t, t, eps - x0.detach()), x0.detach())


def test_dmd_gradient_is_zero_when_the_fake_score_equals_the_real_one():
    x0, _, t, x_t, g = setup()
    v = torch.randn(x0.shape, generator=g)
    assert torch.count_nonzero(grad_of(dmd_loss(x0, x_t, t, v, v), x0)) == 0


def test_dmd_moves_the_sample_from_the_fake_estimate_toward_the_real_one():
    x0, _, t, x_t, g = setup()
    v_real, v_fake = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    grad = grad_of(dmd_loss(x0, x_t, t, v_fake, v_real), x0)
    p_real, p_fake = x0_from_v(x_t, t, v_real), x0_from_v(x_t, t, v_fake)
    weight = (x0.detach() - p_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    numel = x0[0].numel()
    torch.testing.assert_close(grad, (p_fake - p_real) / weight / numel)  # descent moves x0 along real − fake


def test_decoupled_terms_sum_to_dmd_against_the_guided_teacher():
    x0, _, t, x_t, g = setup()
    v_fake, v_cond, v_uncond = (torch.randn(x0.shape, generator=g) for _ in range(3))
    w = 5.0
    dm, ca = decoupled_dmd(x0, x_t, t, v_fake, v_cond, v_uncond, guidance=w)
    v_cfg = v_uncond + w * (v_cond - v_uncond)
    torch.testing.assert_close(grad_of(dm + ca, x0), grad_of(dmd_loss(x0, x_t, t, v_fake, v_cfg), x0))
    # guidance 1 is no guidance: the CFG term vanishes
    _, ca1 = decoupled_dmd(x0, x_t, t, v_fake, v_cond, v_uncond, guidance=1.0)
    assert torch.count_nonzero(grad_of(ca1, x0)) == 0


def test_gan_losses_prefer_the_right_side():
    confident = torch.full((2, 1), 8.0)
    assert (discriminator_loss(confident, -confident) < 1e-3).all()  # real called real, fake called fake
    assert (discriminator_loss(-confident, confident) > 15).all()
    assert (generator_gan_loss(confident) < 1e-3).all() and (generator_gan_loss(-confident) > 7).all()


def test_approx_r1_is_zero_for_a_flat_discriminator_and_scales_with_gamma_and_slope():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    near = perturbed(x, 0.1, torch.Generator().manual_seed(2))
    assert 0 < (near - x).abs().max() < 1  # a neighbour, α·ε away

    def r1(disc, gamma=1.0):
        return approx_r1(disc(x), disc(near), gamma)

    assert r1(lambda z: torch.ones(z.shape[0], 1)).abs().max() == 0

    def linear(k):
        return lambda z: k * z.flatten(1).sum(1, keepdim=True)

    one = r1(linear(1.0))
    assert (one > 0).all()
    torch.testing.assert_close(r1(linear(2.0)), 4 * one)  # the penalty is the slope squared
    torch.testing.assert_close(r1(linear(1.0), gamma=3.0), 3 * one)
