"""LoRA files (inference/lora.py): the key styles other tools write, their scales, merging, and the refusals."""

import pytest
import torch
from safetensors.torch import save_file

from inference.config import get_preset
from inference.lora import export_state, merge_adapters, parse_lora_arg, read_adapter
from inference.mmdit import MMDiT

MODULE = "transformer_blocks.1.attn.img_qkv"


def pair(rank: int = 4, seed: int = 0):
    cfg = get_preset("tiny")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, cfg.hidden, generator=g), torch.randn(3 * cfg.hidden, rank, generator=g)


@pytest.mark.parametrize("style,scale", [
    ("diffusers", 1.0),  # transformer.X.lora_A.weight, no alpha: α = r
    ("comfy", 0.5),  # diffusion_model.X.lora_A.weight + X.alpha = 2 over r 4
    ("peft", 1.0),  # base_model.model.X.lora_A.weight
    ("named", 1.0),  # X.lora_A.default.weight (a peft model's own state dict)
])
def test_key_styles_read_to_the_same_module_and_their_scale(tmp_path, style, scale):
    a, b = pair()
    keys = {"diffusers": ("transformer.", ".lora_A.weight", ".lora_B.weight"),
            "comfy": ("diffusion_model.", ".lora_A.weight", ".lora_B.weight"),
            "peft": ("base_model.model.", ".lora_A.weight", ".lora_B.weight"),
            "named": ("", ".lora_A.default.weight", ".lora_B.default.weight")}[style]
    state = {f"{keys[0]}{MODULE}{keys[1]}": a, f"{keys[0]}{MODULE}{keys[2]}": b}
    if style == "comfy":
        state[f"{keys[0]}{MODULE}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "l.safetensors"))
    adapter = read_adapter(tmp_path / "l.safetensors")
    (got_a, got_b, got_scale), = adapter.modules.values()
    assert list(adapter.modules) == [MODULE] and got_scale == scale
    assert torch.equal(got_a, a) and torch.equal(got_b, b)


def test_merge_adds_weight_times_scale_times_b_a_and_export_bakes_the_scale(tmp_path):
    a, b = pair()
    save_file({f"diffusion_model.{MODULE}.lora_A.weight": a, f"diffusion_model.{MODULE}.lora_B.weight": b,
               f"diffusion_model.{MODULE}.alpha": torch.tensor(8.0)}, str(tmp_path / "l.safetensors"))
    adapter = read_adapter(tmp_path / "l.safetensors")  # scale 8 / 4 = 2
    model = MMDiT(get_preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapters(model, [(adapter, 0.5)])
    after = model.state_dict()
    torch.testing.assert_close(after[f"{MODULE}.weight"], before[f"{MODULE}.weight"] + 0.5 * 2 * b @ a)
    assert all(torch.equal(after[k], before[k]) for k in before if k != f"{MODULE}.weight")
    baked = export_state(adapter, prefix="transformer.")
    torch.testing.assert_close(baked[f"transformer.{MODULE}.lora_B.weight"], 2 * b)


def test_an_adapter_of_another_model_is_refused_by_name_and_shape(tmp_path):
    a, b = pair()
    save_file({"blocks.0.q.lora_A.weight": a, "blocks.0.q.lora_B.weight": b}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="adapts blocks.0.q, which this model does not have"):
        merge_adapters(MMDiT(get_preset("tiny")), [(read_adapter(tmp_path / "other.safetensors"), 1.0)])
    a2, b2 = torch.randn(4, 64), torch.randn(192, 4)
    save_file({f"{MODULE}.lora_A.weight": a2, f"{MODULE}.lora_B.weight": b2}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="a LoRA of another model size"):
        merge_adapters(MMDiT(get_preset("tiny")), [(read_adapter(tmp_path / "small.safetensors"), 1.0)])
    save_file({f"{MODULE}.lora_A.weight": a2}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        read_adapter(tmp_path / "half.safetensors")
    save_file({"img_in.weight": a2}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA key"):
        read_adapter(tmp_path / "weights.safetensors")


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors") == (parse_lora_arg("a/b.safetensors:1")[0], 1.0)
    assert parse_lora_arg("a/b.safetensors:0.6")[1] == 0.6
    assert parse_lora_arg("C:/x.safetensors")[1] == 1.0  # a ':' that no number follows is part of the path


def test_generate_applies_loras_with_scales_to_any_base(tmp_path):
    from inference.checkpoint import CheckpointSpec, describe_denoiser, load_source, save_random_checkpoint
    from pipelines import cli

    step = save_random_checkpoint(tmp_path / "base" / "step_00000001", CheckpointSpec(model=get_preset("tiny")))
    a, b = pair()
    save_file({f"transformer.{MODULE}.lora_A.weight": a * 0.1, f"transformer.{MODULE}.lora_B.weight": b * 0.1},
              str(tmp_path / "l.safetensors"))
    args = ["generate", "a red circle", "--checkpoint", str(step), "--steps", "2", "--n", "1", "--size", "32x32"]
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "lora"), "--lora", f"{tmp_path / 'l.safetensors'}:0.7"]) == 0
    import json

    from PIL import Image

    settings = json.loads((tmp_path / "lora" / "generate.json").read_text())
    assert settings["lora"] == [{"file": str(tmp_path / "l.safetensors"), "scale": 0.7}]
    plain, tuned = (Image.open(tmp_path / d / "000_00.png").tobytes() for d in ("plain", "lora"))
    assert plain != tuned
    source = describe_denoiser(step).with_adapters([(tmp_path / "l.safetensors", 0.7)])
    merged = load_source(source).state_dict()[f"{MODULE}.weight"]
    base = load_source(describe_denoiser(step)).state_dict()[f"{MODULE}.weight"]
    torch.testing.assert_close(merged - base, 0.7 * (0.1 * b) @ (0.1 * a), rtol=1e-4, atol=1e-6)
