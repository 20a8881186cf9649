import math

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from inference.flow import (
    RectifiedFlow,
    empirical_mu,
    initial_noise,
    lens_mu,
    per_token_norm,
    sigma_schedule,
    time_shift,
)


class Field:
    """A known velocity field: every trajectory is the straight line from its noise to `x0` (v = (x − x0)/t)."""

    def __init__(self, x0, out="velocity"):
        self.x0, self.out, self.calls = x0, out, []

    def __call__(self, x, t, text, mask):
        self.calls.append((x.shape[0], text.shape))
        if self.out == "x":
            return self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)
        tt = t.view(-1, 1, 1, 1)
        return (x - self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)) / tt


def test_euler_integrates_a_known_velocity_field_exactly():
    # exact up to the float32 rounding of t = (1000·σ)/1000 that the Lens scheduler's timesteps carry
    x0, noise = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    text, mask = torch.zeros(2, 3, 6), torch.ones(2, 3, dtype=torch.bool)
    for steps in 1, 7, 20:
        out = RectifiedFlow().sample(Field(x0), noise, text, mask, steps=steps)
        assert torch.allclose(out, x0, atol=1e-6)
    # the same with x-prediction (converted to a velocity) and with CFG between two equal predictions
    out = RectifiedFlow(prediction="x", t_min=0.0).sample(Field(x0, "x"), noise, text, mask, steps=5)
    assert torch.allclose(out, x0, atol=1e-6)
    field = Field(x0)
    out = RectifiedFlow().sample(field, noise, text, mask, steps=4, cfg=5.0, neg=(text[:1, :0], mask[:1, :0]))
    assert torch.allclose(out, x0, atol=1e-6)
    assert field.calls == [(4, (4, 3, 6))] * 4  # cond and negative in one batch, padded to one length


def test_schedule_and_shift():
    sig = sigma_schedule(20, 4096)
    assert sig.shape == (21,) and sig[0] == 1 and sig[-1] == 0 and (sig.diff() < 0).all()
    mu = empirical_mu(4096, 20)
    assert mu == pytest.approx(compute_empirical_mu(4096, 20))  # FLUX.2's fit
    assert empirical_mu(5000, 20) == pytest.approx(compute_empirical_mu(5000, 20))
    assert sig[1] == pytest.approx(time_shift(torch.tensor(1 - 1 / 20), mu).item())
    assert sigma_schedule(20, 4096, mu=0.0)[:-1].allclose(torch.linspace(1, 1 / 20, 20))
    n = torch.randn(100)
    assert torch.allclose(time_shift(torch.sigmoid(n), 1.3), torch.sigmoid(n + 1.3), atol=1e-6)
    assert (lens_mu(256), lens_mu(4096)) == (pytest.approx(1.0), pytest.approx(1.3))
    with pytest.raises(ValueError):
        sigma_schedule(0, 64)


def test_training_timesteps_shift_with_resolution():
    flow, g = RectifiedFlow(), torch.Generator().manual_seed(0)
    t_small, t_big = flow.sample_t(20000, 256, generator=g), flow.sample_t(20000, 4096, generator=g)
    assert ((t_small > 0) & (t_small < 1)).all()
    assert torch.logit(t_small).mean() == pytest.approx(1.0, abs=0.03)
    assert torch.logit(t_big).mean() == pytest.approx(1.3, abs=0.03)


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    text, mask = torch.zeros(3, 2, 6), torch.ones(3, 2, dtype=torch.bool)
    flow = RectifiedFlow()
    assert flow.loss(lambda x, tt, *_: noise - x0, x0, text, mask, t=t, noise=noise).abs().max() < 1e-10
    xflow = RectifiedFlow(prediction="x")
    assert xflow.loss(lambda *_: x0, x0, text, mask, t=t, noise=noise).abs().max() < 1e-10
    loss = flow.loss(lambda x, *_: torch.zeros_like(x), x0, text, mask)
    assert loss.shape == (3,) and (loss > 0).all()


def test_cfg_rescales_each_token_to_the_conditional_norm():
    flow = RectifiedFlow()
    v_cond, v_neg = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    model = lambda x, t, text, mask: torch.cat([v_cond, v_neg])  # noqa: E731
    x, t = torch.zeros(1, 4, 8, 8), torch.ones(1)
    cond, neg = (torch.zeros(1, 2, 6), torch.ones(1, 2, dtype=torch.bool)), (torch.zeros(1, 0, 6),
                                                                              torch.ones(1, 0, dtype=torch.bool))
    v = flow.guided_velocity(model, x, t, cond, neg, 4.0, patch=2)
    assert torch.allclose(per_token_norm(v, 2), per_token_norm(v_cond, 2), atol=1e-5)
    direction = v_neg + 4 * (v_cond - v_neg)
    assert torch.allclose(torch.nn.functional.cosine_similarity(
        torch.nn.functional.pixel_unshuffle(v, 2), torch.nn.functional.pixel_unshuffle(direction, 2), dim=1),
        torch.ones(1, 4, 4), atol=1e-5)


def test_noise_is_seeded_per_image():
    a = initial_noise((3, 4, 8, 8), [0, 1, 2])
    b = initial_noise((2, 4, 8, 8), [2, 0])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert math.isclose(a.std().item(), 1.0, abs_tol=0.15)


def test_sampling_refuses_non_finite_guidance_and_calls_on_step_once_a_step():
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    text, mask = torch.zeros(1, 3, 6), torch.ones(1, 3, dtype=torch.bool)
    neg = (text[:, :0], mask[:, :0])
    for cfg in math.nan, math.inf, -1.0:  # NaN guidance made every latent NaN: a black image, no error
        with pytest.raises(ValueError, match=r"guidance scale \(cfg\) .*: must be a finite number ≥ 0"):
            RectifiedFlow().sample(Field(x0), noise, text, mask, steps=2, cfg=cfg, neg=neg)
    with pytest.raises(ValueError, match="shift mu inf"):
        RectifiedFlow().sample(Field(x0), noise, text, mask, steps=2, mu=math.inf)
    calls = []
    RectifiedFlow().sample(Field(x0), noise, text, mask, steps=3, cfg=2.0, neg=neg, on_step=lambda: calls.append(1))
    assert len(calls) == 3
