import pytest
import torch

from inference.codecs import patchify_2x2
from inference.config import get_preset
from inference.mmdit import JointBlock, MMDiT, patchify, unpatchify
from inference.layers import rope_freqs, rope_positions

CFG = get_preset("tiny").model_copy(update={"depth": 2})
TEXT = CFG.text_layers * CFG.text_dim


def perturbed(seed=0):
    torch.manual_seed(seed)
    model = MMDiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(b=2, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CFG.in_channels, 8, 8, generator=g)
    return x, torch.rand(b, generator=g), torch.randn(b, length, TEXT, generator=g)


def test_blocks_are_identity_at_init_and_the_model_outputs_zero():
    model = MMDiT(CFG)
    img, txt, cond = torch.randn(2, 64, CFG.hidden), torch.randn(2, 5, CFG.hidden), torch.randn(2, CFG.hidden)
    freqs = rope_freqs(rope_positions(8, 8, 5), CFG.rope_axes, CFG.rope_theta)
    for block in model.blocks:
        out_img, out_txt = block(img, txt, cond, freqs, None)
        assert torch.equal(out_img, img) and torch.equal(out_txt, txt)
    x, t, text = inputs()
    assert torch.equal(model(x, t, text), torch.zeros_like(x))


def test_padded_text_changes_nothing():
    model = perturbed()
    x, t, text = inputs(b=1, length=4)
    ref = model(x, t, text, torch.ones(1, 4, dtype=torch.bool))
    padded = torch.cat([text, torch.randn(1, 6, TEXT) * 100], dim=1)  # junk in the padding
    mask = torch.tensor([[True] * 4 + [False] * 6])
    assert torch.allclose(model(x, t, padded, mask), ref, atol=1e-5)
    # batch with a longer prompt: the short one's result is unchanged
    both = torch.cat([padded, torch.randn(1, 10, TEXT)])
    out = model(torch.cat([x, x]), torch.cat([t, t]), both, torch.cat([mask, torch.ones(1, 10, dtype=torch.bool)]))
    assert torch.allclose(out[:1], ref, atol=1e-5)
    assert not torch.allclose(out[1:], ref, atol=1e-3)


def test_empty_prompt_is_no_tokens():
    model = perturbed()
    x, t, text = inputs(b=1)
    empty = model(x, t, text[:, :0], torch.zeros(1, 0, dtype=torch.bool))
    masked = model(x, t, text, torch.zeros(1, text.shape[1], dtype=torch.bool))
    assert torch.allclose(empty, masked, atol=1e-5)
    assert not torch.allclose(empty, model(x, t, text), atol=1e-3)


def test_patchify_inverse_and_flux2_token_order():
    z = torch.randn(2, 32, 6, 10)
    tokens = patchify(z, 2)
    assert tokens.shape == (2, 15, 128)
    assert torch.equal(unpatchify(tokens, 3, 5, 2), z)
    # token (i, j) is FLUX.2's patchified 128-channel vector at (i, j)
    assert torch.equal(tokens.view(2, 3, 5, 128).permute(0, 3, 1, 2), patchify_2x2(z))


def test_model_learns_with_gradients_everywhere_and_runs_under_bf16_autocast():
    model = perturbed()
    x, t, text = inputs()
    model(x, t, text).square().mean().backward()
    # The last block's text stream after attention feeds nothing (SD3 drops it: `context_pre_only`); Lens's
    # ≈ 4.10 B count includes it, so it is kept but not computed.
    last = f"blocks.{CFG.depth - 1}.txt."
    for name, p in model.named_parameters():
        dead = name.startswith((last + "q_norm", last + "proj", last + "mlp"))
        assert (p.grad is None) == dead, name
        assert dead or p.grad.abs().sum() > 0, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, torch.ones(2, text.shape[1], dtype=torch.bool))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_wrong_text_width_and_latent_shape_are_clear_errors():
    model = MMDiT(CFG)
    x, t, text = inputs()
    with pytest.raises(ValueError, match="expects 2 layers × 384"):
        model(x, t, text[..., :100])
    with pytest.raises(ValueError, match="48 channels"):
        model(x[:, :3], t, text)


def test_no_python_loop_over_tokens():
    """One attention call per block, whatever the sequence length (SDPA with the key mask)."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    try:
        x, t, text = inputs(b=2, length=7)
        MMDiT(CFG)(x, t, text, torch.tensor([[True] * 7, [True] * 3 + [False] * 4]))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    joint, last = (2, CFG.heads, 64 + 7, CFG.head_dim), (2, CFG.heads, 64, CFG.head_dim)  # last: image queries
    assert calls == [joint] * (CFG.depth - 1) + [last]
    assert isinstance(MMDiT(CFG).blocks[0], JointBlock)
