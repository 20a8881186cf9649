import pytest
import torch
from pydantic import ValidationError

from inference.config import PRESETS, ModelConfig, get_preset, list_models
from inference.generate import size_for_aspect
from inference.mmdit import MMDiT, count_parameters

LENS_PARAMETERS = 4_104_225_152  # README / inference/README.md; the released checkpoint's count


def test_registry_lists_every_preset():
    assert list_models() == ["lens-3.8b", "small", "tiny"]
    assert get_preset("tiny").name == "tiny"
    with pytest.raises(LookupError, match="known: lens-3.8b"):
        get_preset("huge")


def test_lens_preset_is_as_published():
    cfg = get_preset("lens-3.8b")
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.head_dim, cfg.mlp) == (48, 1536, 24, 64, 4096)
    assert (cfg.text_layers, cfg.text_dim, cfg.in_channels, cfg.patch, cfg.token_channels) == (4, 2880, 32, 2, 128)
    assert cfg.rope_axes == (8, 28, 28)


def test_every_preset_is_a_released_transformer_config():
    import json

    from inference.lens_format import RELEASE_CONFIGS, RELEASE_FIELDS, model_config_from_release, release_config

    released = json.loads((RELEASE_CONFIGS / "transformer_config.json").read_text())
    ours = release_config(get_preset("lens-3.8b"), [5, 11, 17, 23])
    assert {k: ours[k] for k in RELEASE_FIELDS} == {k: released[k] for k in RELEASE_FIELDS}
    assert set(RELEASE_FIELDS) == set(released) - {"_class_name", "_diffusers_version"}
    assert model_config_from_release(released, name="lens-3.8b") == get_preset("lens-3.8b")
    for name, cfg in PRESETS.items():  # every preset converts there and back
        back = model_config_from_release(release_config(cfg, list(range(cfg.text_layers))), name=name,
                                         base_size=cfg.base_size)
        assert back == cfg, name
    # the released class derives the gated-MLP width: tiny's 128 → int(128 / 3 · 8) = 341
    assert [PRESETS[n].mlp for n in ("lens-3.8b", "small", "tiny")] == [4096, 1024, 341]


def test_lens_parameter_count_on_meta():
    assert count_parameters(get_preset("lens-3.8b")) == LENS_PARAMETERS  # ≈ 4.10 B, as Lens reports


def test_lens_meta_forward_at_1024_and_a_1_to_2_bucket():
    cfg = get_preset("lens-3.8b")
    with torch.device("meta"):
        model = MMDiT(cfg)
        for width, height in (1024, 1024), size_for_aspect("1:2", 1024):
            x = torch.empty(1, 32, height // 8, width // 8)
            text, mask = torch.empty(1, 40, 4 * 2880), torch.ones(1, 40, dtype=torch.bool)
            out = model(x, torch.empty(1), text, mask)
            assert out.shape == x.shape
    assert (1024 // 16) ** 2 == 4096  # image tokens at 1024²


def test_configs_are_validated():
    fields = PRESETS["tiny"].model_dump()
    with pytest.raises(ValidationError, match="head_dim"):
        ModelConfig(**{**fields, "heads": 3})
    with pytest.raises(ValidationError, match="rope_axes"):
        ModelConfig(**{**fields, "rope_axes": (4, 14, 12)})
