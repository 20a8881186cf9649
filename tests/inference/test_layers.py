import torch

from inference.layers import RMSNorm, SwiGLU, apply_rope, rope_freqs, rope_positions, timestep_features


def test_image_positions_are_centred_and_text_continues():
    h, w, text_len = 4, 6, 3
    pos = rope_positions(h, w, text_len)
    image, text = pos[: h * w], pos[h * w :]
    assert pos.shape == (h * w + text_len, 3)
    assert torch.equal(image.mean(0), torch.zeros(3))  # centred on the grid's middle, frame 0
    assert torch.equal(image[:, 1].unique(), torch.arange(h) - (h - 1) / 2)
    assert torch.equal(image[:, 2].unique(), torch.arange(w) - (w - 1) / 2)
    assert image[1, 2] - image[0, 2] == 1  # row-major
    start = image[:, 1:].max() + 1
    assert torch.equal(text, (start + torch.arange(text_len))[:, None].expand(-1, 3))


def test_rope_is_a_rotation_that_sees_only_relative_positions():
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        fq = rope_freqs(torch.tensor([pq], dtype=torch.float32), axes, 10_000.0)
        fk = rope_freqs(torch.tensor([pk], dtype=torch.float32), axes, 10_000.0)
        return (apply_rope(q, fq) * apply_rope(k, fk)).sum()

    freqs = rope_freqs(torch.tensor([[0.0, 2.5, -1.5]]), axes, 10_000.0)
    assert freqs.shape == (1, 8) and torch.allclose(freqs.abs(), torch.ones(1, 8))
    assert torch.allclose(apply_rope(q, freqs).norm(), q.norm())
    # pair (0, 1) of the first axis turns by the frame position (0 here): unchanged
    assert torch.allclose(apply_rope(q, freqs)[..., :2], q[..., :2])
    a = score([0, 1, 2], [0, 3, -1])
    b = score([1, 5, 7], [1, 7, 4])  # same offsets on every axis
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, score([0, 1, 2], [0, 3, 0]), atol=1e-3)


def test_rmsnorm_swiglu_and_timestep_features():
    norm = RMSNorm((2, 8))  # one weight row per text layer
    x = torch.randn(3, 5, 2, 8) * 7
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5, 2), atol=1e-4)
    assert y.dtype == norm(x.bfloat16()).float().dtype
    assert SwiGLU(8, 12)(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert sum(p.numel() for p in SwiGLU(8, 12).parameters()) == 3 * 8 * 12  # no bias
    feats = timestep_features(torch.tensor([0.0, 0.5, 1.0]), 256)
    assert feats.shape == (3, 256) and not torch.allclose(feats[1], feats[2])
