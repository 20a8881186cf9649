"""Each layer against the diffusers layer the released Lens model is built from: equal, not close."""

import torch
from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
from diffusers.models.embeddings import Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from inference.layers import (
    AdaLayerNormOut,
    GateMLP,
    RMSNorm,
    TimeEmbed,
    apply_rope,
    modulate,
    rope_freqs,
    rope_positions,
    timestep_features,
)


def _randomize(*modules):
    torch.manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn_like(p))


def test_rmsnorm_is_diffusers_rmsnorm_with_its_weight_and_eps():
    for eps, dtype in (1e-6, torch.float32), (1e-5, torch.float32), (1e-6, torch.bfloat16):
        ours, ref = RMSNorm(24, eps).to(dtype), DiffusersRMSNorm(24, eps=eps).to(dtype)
        _randomize(ours)
        ref.load_state_dict(ours.state_dict())
        x = (torch.randn(2, 5, 24) * 7).to(dtype)
        assert torch.equal(ours(x), ref(x)) and ours(x).dtype == dtype
    assert torch.allclose(RMSNorm(8)(torch.randn(3, 8) * 9).pow(2).mean(-1), torch.ones(3), atol=1e-4)


def test_final_norm_is_layernorm_without_affine_modulated_by_scale_then_shift():
    ours, ref = AdaLayerNormOut(16), AdaLayerNormContinuous(16, 16, elementwise_affine=False, eps=1e-6)
    _randomize(ours)
    ref.load_state_dict(ours.state_dict())  # the same key: `linear` (the norm has no weights)
    assert sorted(ours.state_dict()) == ["linear.bias", "linear.weight"]
    x, temb = torch.randn(2, 7, 16), torch.randn(2, 16)
    assert torch.equal(ours(x, temb), ref(x, temb))
    # chunk order: the first half of the projection scales, the second shifts
    with torch.no_grad():
        ours.linear.weight.zero_()
        ours.linear.bias.copy_(torch.cat([torch.full((16,), 1.0), torch.full((16,), 3.0)]))
    normed = torch.nn.functional.layer_norm(x, (16,), eps=1e-6)
    assert torch.allclose(ours(x, temb), normed * 2 + 3, atol=1e-6)


def test_timestep_embedding_is_diffusers_timesteps_and_mlp():
    t = torch.tensor([0.0, 0.0371, 0.5, 0.999, 1.0])
    ref_features = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)(t)
    assert torch.equal(timestep_features(t), ref_features)
    ours, ref = TimeEmbed(32), DiffusersTimestepEmbedding(in_channels=256, time_embed_dim=32)
    _randomize(ours)
    ref.load_state_dict({k.removeprefix("timestep_embedder."): v for k, v in ours.state_dict().items()})
    assert sorted(ours.state_dict()) == ["timestep_embedder.linear_1.bias", "timestep_embedder.linear_1.weight",
                                         "timestep_embedder.linear_2.bias", "timestep_embedder.linear_2.weight"]
    assert torch.equal(ours(t, torch.empty(0)), ref(ref_features))
    # in a bf16 model t itself is rounded to bf16 first, as the release does
    bf16 = TimeEmbed(32).to(torch.bfloat16)
    assert torch.equal(bf16(t, torch.empty(0, dtype=torch.bfloat16)),
                       bf16(t.bfloat16().float(), torch.empty(0, dtype=torch.bfloat16)))


def test_image_positions_are_integers_around_the_centre_and_text_follows():
    for h, w in (4, 6), (3, 5), (1, 1):
        pos = rope_positions(h, w, 3)
        image, text = pos[: h * w], pos[h * w:]
        assert pos.dtype == torch.int64 and pos.shape == (h * w + 3, 3)
        assert torch.equal(image[:, 0], torch.zeros(h * w, dtype=torch.int64))  # frame 0
        assert image[:, 1].unique().tolist() == list(range(-(h - h // 2), h // 2))  # rows −(h − h//2) … h//2 − 1
        assert image[:, 2].unique().tolist() == list(range(-(w - w // 2), w // 2))
        assert w == 1 or image[1, 2] - image[0, 2] == 1  # row-major
        start = max(h // 2, w // 2)
        assert torch.equal(text, (start + torch.arange(3))[:, None].expand(-1, 3))
    assert rope_positions(4, 4, 0)[:, 1].unique().tolist() == [-2, -1, 0, 1]


def test_rope_is_a_rotation_that_sees_only_relative_positions():
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        fq, fk = rope_freqs(torch.tensor([pq]), axes), rope_freqs(torch.tensor([pk]), axes)
        return (apply_rope(q, fq) * apply_rope(k, fk)).sum()

    freqs = rope_freqs(torch.tensor([[0, 2, -1]]), axes)
    assert freqs.shape == (1, 8) and torch.allclose(freqs.abs(), torch.ones(1, 8))
    assert torch.allclose(apply_rope(q, freqs).norm(), q.norm())
    assert torch.equal(apply_rope(q, freqs)[..., :4], q[..., :4])  # the frame axis at 0 turns nothing
    assert torch.allclose(score([0, 1, 2], [0, 3, -1]), score([1, 5, 7], [1, 7, 4]), atol=1e-5)
    assert not torch.allclose(score([0, 1, 2], [0, 3, -1]), score([0, 1, 2], [0, 3, 0]), atol=1e-3)
    # the angle of pair i on an axis of width d is position · 10000^(−2i/d), the release's frequencies
    angle = torch.angle(rope_freqs(torch.tensor([[0, 3, 0]]), axes))[0, 2:5]
    assert torch.allclose(angle, 3 * 10000 ** (-torch.arange(0, 6, 2) / 6.0), atol=1e-6)


def test_gate_mlp_modulate_and_names():
    mlp = GateMLP(8, 12)
    assert sorted(mlp.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]  # no bias
    x = torch.randn(2, 3, 8)
    assert torch.allclose(mlp(x), mlp.w2(torch.nn.functional.silu(mlp.w1(x)) * mlp.w3(x)))
    mods = torch.randn(2, 24)
    out, gate = modulate(x, mods)
    shift, scale, g = mods.chunk(3, dim=-1)
    assert torch.equal(out, x * (1 + scale[:, None]) + shift[:, None]) and torch.equal(gate, g[:, None])
