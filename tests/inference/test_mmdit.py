import pytest
import torch

from inference.codecs import patchify_2x2
from inference.config import get_preset
from inference.layers import rope_freqs, rope_positions
from inference.mmdit import JointBlock, MMDiT, patchify, unpatchify

CFG = get_preset("tiny").model_copy(update={"depth": 2})
TEXT = CFG.text_layers * CFG.text_dim

# The released LensTransformer2DModel's parameter names (diffusers PR #13837), per block and outside the blocks.
BLOCK_KEYS = [f"attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")] + [
    f"{n}.{p}" for n in ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out", "img_mod.1",
                         "txt_mod.1") for p in ("weight", "bias")] + [
    f"{s}_{n}.weight" for s in ("img", "txt") for n in ("norm1", "norm2", "mlp.w1", "mlp.w2", "mlp.w3")]
TOP_KEYS = ["img_in.weight", "img_in.bias", "txt_in.weight", "txt_in.bias", "txt_norm.0.weight", "txt_norm.1.weight",
            "norm_out.linear.weight", "norm_out.linear.bias", "proj_out.weight", "proj_out.bias"] + [
    f"time_text_embed.timestep_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]


def perturbed(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    model = MMDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(b=2, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CFG.in_channels, 8, 8, generator=g)
    return x, torch.rand(b, generator=g), torch.randn(b, length, TEXT, generator=g)


def test_parameter_names_and_shapes_are_the_releases():
    state = MMDiT(CFG).state_dict()
    expected = TOP_KEYS + [f"transformer_blocks.{i}.{k}" for i in range(CFG.depth) for k in BLOCK_KEYS]
    assert sorted(state) == sorted(expected)
    d, m = CFG.hidden, CFG.mlp
    assert m == 341  # int(128 / 3 · 8), the released class's rule
    shapes = {"transformer_blocks.0.attn.img_qkv.bias": (3 * d,), "transformer_blocks.0.attn.to_out.0.bias": (d,),
              "transformer_blocks.0.img_norm1.weight": (d,), "transformer_blocks.0.attn.norm_q.weight": (32,),
              "transformer_blocks.0.img_mlp.w1.weight": (m, d), "transformer_blocks.0.img_mod.1.weight": (6 * d, d),
              "img_in.weight": (d, CFG.token_channels), "proj_out.weight": (CFG.token_channels, d),
              "norm_out.linear.weight": (2 * d, d), "txt_in.weight": (d, TEXT), "txt_norm.1.weight": (384,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_norm_epsilons_are_the_releases():
    model = MMDiT(CFG)
    block = model.transformer_blocks[0]
    assert [n.eps for n in (block.img_norm1, block.txt_norm2, block.attn.norm_q, block.attn.norm_added_k)] == [1e-6] * 4
    assert [n.eps for n in model.txt_norm] == [1e-5, 1e-5]
    assert model.norm_out.norm.eps == 1e-6 and not model.norm_out.norm.elementwise_affine


def test_blocks_are_identity_at_init_and_the_model_outputs_zero():
    model = MMDiT(CFG)
    img, txt, temb = torch.randn(2, 64, CFG.hidden), torch.randn(2, 5, CFG.hidden), torch.randn(2, CFG.hidden)
    freqs = rope_freqs(rope_positions(8, 8, 5), CFG.rope_axes)
    for block in model.transformer_blocks:
        out_img, out_txt = block(img, txt, temb, freqs, None)
        assert torch.equal(out_img, img) and torch.equal(out_txt, txt)
    x, t, text = inputs()
    assert torch.equal(model(x, t, text), torch.zeros_like(x))


def test_biases_and_norm_weights_take_part():
    model, (x, t, text) = perturbed(), inputs()
    ref = model(x, t, text)
    for name in "transformer_blocks.0.attn.img_qkv.bias", "transformer_blocks.0.attn.to_out.0.bias", \
            "transformer_blocks.0.img_norm1.weight", "txt_norm.0.weight":
        changed = perturbed()
        with torch.no_grad():
            changed.get_parameter(name).mul_(1.5).add_(0.1)
        assert not torch.allclose(changed(x, t, text), ref, atol=1e-6), name


def test_padded_text_is_masked_in_every_block():
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
    # the diffusers port masks only its first block: from the second on, the padding's junk leaks in
    model.masked_blocks = 1
    assert not torch.allclose(model(x, t, padded, mask), ref, atol=1e-3)


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
    # The last block's text stream after attention feeds nothing (SD3 drops it: `context_pre_only`); the release
    # keeps its weights, so they are kept but not computed.
    last = f"transformer_blocks.{CFG.depth - 1}."
    dead = tuple(last + n for n in ("attn.norm_added_q", "attn.to_add_out", "txt_norm2", "txt_mlp"))
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith(dead), name
        assert name.startswith(dead) or p.grad.abs().sum() > 0, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, torch.ones(2, text.shape[1], dtype=torch.bool))
    assert out.shape == x.shape and torch.isfinite(out).all()
    bf16 = perturbed().to(torch.bfloat16)  # bf16 weights, no autocast: the release's way of running
    assert bf16(x.bfloat16(), t, text.bfloat16()).dtype == torch.bfloat16


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
    assert isinstance(MMDiT(CFG).transformer_blocks[0], JointBlock)
