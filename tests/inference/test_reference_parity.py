"""lensforge against the reference implementation itself: diffusers PR #13837 (`LensTransformer2DModel`,
`LensPipeline`, `LensGptOssEncoder`), on random weights, both ways, exactly.

The PR is not in any diffusers release, so this module is skipped unless the installed diffusers has it, e.g.

    .venv/bin/pip install "git+https://github.com/huggingface/diffusers@d004842010be438a786e851450e7125780ae6c8e"
    .venv/bin/pytest tests/inference/test_reference_parity.py
"""

import datetime

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "LensTransformer2DModel"):
    pytest.skip("diffusers without Lens (PR #13837): nothing to compare with", allow_module_level=True)

from diffusers import LensPipeline, LensTransformer2DModel  # noqa: E402
from diffusers.pipelines.lens.pipeline_lens import LensGptOssEncoder  # noqa: E402

from inference.checkpoint import load_denoiser  # noqa: E402
from inference.generate import Pipeline  # noqa: E402
from inference.lens_format import write_transformer_dir  # noqa: E402
from inference.mmdit import patchify, unpatchify  # noqa: E402
from tests.inference.tiny_release import save_tiny_release  # noqa: E402

CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16,
              num_attention_heads=3, inner_dim=48, enc_hidden_dim=24, axes_dims_rope=(4, 6, 6),
              selected_layer_index=(1, 3))
H, W, L = 6, 4, 5  # token grid and text length


def aligned(model):
    """The model with every weight in its own torch allocation. diffusers' loader leaves some tensors in the
    file's memory map at whatever alignment the file gives them (16, 24 … bytes), and CPU matmul kernels round
    differently there: equal weights, outputs 1e-7 apart. lensforge always reads into aligned allocations."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def reference_forward(model, x, t, text, mask):
    out = model(hidden_states=patchify(x, 2), encoder_hidden_states=list(text.split(24, dim=-1)),
                encoder_hidden_states_mask=mask, timestep=t, img_shapes=[(1, H, W)], return_dict=False)[0]
    return unpatchify(out, H, W, 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    ref = LensTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("ref") / "transformer"
    ref.save_pretrained(folder, max_shard_size="20KB")
    return ref, folder


@torch.no_grad()
def test_reference_weights_into_lensforge_are_the_same_function(saved):
    ref, folder = saved
    ours = load_denoiser(folder)
    g = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 16, 2 * H, 2 * W, generator=g), torch.rand(2, generator=g), \
        torch.randn(2, L, 48, generator=g)
    full = torch.ones(2, L, dtype=torch.bool)
    assert torch.equal(reference_forward(ref, x, t, text, full), ours(x, t, text, full))
    padded = torch.tensor([[True] * L, [True] * 3 + [False] * 2])
    ours.masked_blocks = 1  # the port masks its first block only
    assert torch.equal(reference_forward(ref, x, t, text, padded), ours(x, t, text, padded))
    ours.masked_blocks = None  # lensforge masks every block: a real difference, documented
    assert not torch.allclose(reference_forward(ref, x, t, text, padded), ours(x, t, text, padded), atol=1e-3)
    ref16, ours16 = aligned(LensTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()), \
        load_denoiser(folder, dtype=torch.bfloat16)
    a = reference_forward(ref16, x.bfloat16(), t.bfloat16(), text.bfloat16(), None)
    assert torch.equal(a, ours16(x.bfloat16(), t.bfloat16(), text.bfloat16(), None))


@torch.no_grad()
def test_lensforge_exports_load_into_the_reference_bit_for_bit(saved, tmp_path):
    ref, folder = saved
    ours = load_denoiser(folder)
    write_transformer_dir(ours.state_dict(), ours.config, tmp_path / "transformer", [1, 3], max_shard_size="30KB")
    back = aligned(LensTransformer2DModel.from_pretrained(tmp_path / "transformer").eval())
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())
    x, t, text = torch.randn(1, 16, 2 * H, 2 * W), torch.rand(1), torch.randn(1, L, 48)
    assert torch.equal(reference_forward(back, x, t, text, None), ours(x, t, text, None))


@torch.no_grad()
def test_the_whole_pipeline_gives_the_references_image_for_a_seed(tmp_path):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    root = save_tiny_release(tmp_path / "Lens", seed=2)
    ref = LensPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
                       vae=AutoencoderKLFlux2.from_pretrained(root / "vae"),
                       text_encoder=LensGptOssEncoder.from_pretrained(root / "text_encoder"),
                       tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
                       transformer=aligned(LensTransformer2DModel.from_pretrained(root / "transformer")))
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_path(root, date=datetime.date.today().isoformat())  # the reference renders today
    ours.model.masked_blocks = 1
    prompt = "a big red circle on the left of a small blue square"
    kwargs = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0)
    latents = ref(prompt, generator=torch.Generator().manual_seed(7), output_type="latent", **kwargs).images
    assert torch.equal(latents, patchify(ours.latents([prompt], 64, 64, steps=4, cfg=4.0, seeds=[7]), 2))
    image = np.asarray(ref(prompt, generator=torch.Generator().manual_seed(7), **kwargs).images[0])
    assert np.array_equal(image, np.asarray(ours.generate([prompt], 64, 64, steps=4, cfg=4.0, seeds=[7])[0]))
    # text features: equal at every real token
    features, mask = ref._get_text_embeddings([prompt], 512, torch.device("cpu"))
    ours_features, ours_mask = ours.text_encoder.encode([prompt])
    assert torch.equal(mask, ours_mask) and torch.equal(torch.cat(features, dim=-1)[mask], ours_features[ours_mask])


def test_fine_tuned_and_lora_merged_exports_load_into_the_reference_exactly(tmp_path):
    """Train from a tiny release in the released layout (full and LoRA), export, load with the reference."""
    from pipelines import cli
    from scenes.shards import write_scene_shards
    from training.train_config import TrainConfig
    from training.trainer import train

    root = save_tiny_release(tmp_path / "Lens")
    data = tmp_path / "data"
    write_scene_shards(data, {(32, 32): 8}, codec=f"flux2:{root / 'vae'}", text_encoder=f"gpt-oss:{root}",
                       multiple=16)
    common = dict(init_from=str(root), max_steps=2, checkpoint_every=2, progress=False, data={"batch_size": 4},
                  optim={"lr": 1e-2})
    train(TrainConfig(**common), data, tmp_path / "full")
    train(TrainConfig(**common, lora={"rank": 4, "alpha": 8}), data, tmp_path / "lora")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 32, 8, 8, generator=g), torch.tensor([0.6])
    text = torch.randn(1, 7, 4 * 32, generator=g)
    mask = torch.ones(1, 7, dtype=torch.bool)

    def ref_out(model):
        out = model(hidden_states=patchify(x, 2), encoder_hidden_states=list(text.split(32, dim=-1)),
                    encoder_hidden_states_mask=mask, timestep=t, img_shapes=[(1, 4, 4)], return_dict=False)[0]
        return unpatchify(out, 4, 4, 2)

    for run, flags in ("full", []), ("lora", ["--merge-lora"]):
        assert cli.main(["export", str(tmp_path / run), "--out", str(tmp_path / f"{run}-export"), *flags]) == 0
        ref = aligned(LensTransformer2DModel.from_pretrained(tmp_path / f"{run}-export" / "transformer").eval())
        ours = load_denoiser(tmp_path / run)
        with torch.no_grad():
            assert torch.equal(ref_out(ref), ours(x, t, text, mask)), run
    # the adapter alone, in diffusers' format, through the reference's own PEFT loader onto the release
    assert cli.main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "adapter"), "--lora"]) == 0
    ref = aligned(LensTransformer2DModel.from_pretrained(root / "transformer").eval())
    ref.load_lora_adapter(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"), prefix="transformer")
    with torch.no_grad():
        torch.testing.assert_close(ref_out(ref), load_denoiser(tmp_path / "lora")(x, t, text, mask),
                                   rtol=1e-5, atol=1e-5)
