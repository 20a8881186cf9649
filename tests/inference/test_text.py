import pytest
import torch

from inference.text import GPT_OSS_LAYERS, GPT_OSS_TEMPLATE, load_text_encoder, parse_text_spec


def test_minilm_is_a_real_pretrained_encoder_offline(minilm):
    assert (minilm.layers, minilm.dim, minilm.feature_dim) == ((2, 5), 384, 768)
    features, mask = minilm.encode(["a red circle on the left", "a big blue square"])
    assert features.shape[0] == 2 and features.shape[2] == 768 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 6]  # [CLS] words [SEP]
    # pretrained: related prompts are closer than unrelated ones (last layer, mean over tokens)
    def embed(text):
        f, m = minilm.encode([text])
        return f[0, :, 384:].mean(0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(embed("a red circle"), embed("a crimson round disc"), dim=0) > cos(
        embed("a red circle"), embed("quarterly tax filing deadline"), dim=0)


def test_generic_hf_encoder_defaults_to_its_last_layer(minilm):
    from inference.text import _minilm_dir

    enc = load_text_encoder(f"hf:{_minilm_dir()}")
    assert enc.layers == (5,) and enc.feature_dim == 384
    ours, mask = enc.encode(["a red circle"])
    assert torch.allclose(ours, minilm.encode(["a red circle"])[0][..., 384:], atol=1e-5)
    assert minilm.identity()["layers"] == [2, 5] and minilm.identity()["max_tokens"] == 256


def test_empty_prompt_has_no_tokens_and_padding_is_harmless(minilm):
    f, m = minilm.encode(["", "a red circle", ""])
    assert not m[0].any() and not m[2].any() and m[1].sum() == 5
    assert f[0].abs().sum() == 0
    alone, alone_mask = minilm.encode(["a red circle"])
    assert torch.allclose(f[1, : alone.shape[1]], alone[0], atol=1e-5)
    f, m = minilm.encode(["", " "])
    assert f.shape == (2, 0, 768) and m.shape == (2, 0)


def test_gpt_oss_layers_template_prefix_and_final_norm(tiny_gpt_oss):
    enc = load_text_encoder(f"gpt-oss:{tiny_gpt_oss}")
    assert enc.layers == GPT_OSS_LAYERS and enc.dim == 32 and enc.feature_dim == 128
    prompts = ["a red circle", "big green triangle on the right", ""]
    features, mask = enc.encode(prompts)
    assert mask.sum(1).tolist() == [4, 7, 0]  # the prompt's words + <|end|>; the fixed prefix is gone
    # reference: the whole templated sequence through the model, hidden_states[i + 1] = after layer i
    tok, model = enc.tokenizer, enc.model
    ids = tok(GPT_OSS_TEMPLATE.replace("{prompt}", prompts[1]), add_special_tokens=False, return_tensors="pt")
    out = model(**ids, output_hidden_states=True)
    prefix = len(tok(GPT_OSS_TEMPLATE.split("{prompt}")[0], add_special_tokens=False)["input_ids"])
    assert tok.convert_ids_to_tokens(ids["input_ids"][0, prefix:].tolist()) == [
        "big", "green", "triangle", "on", "the", "right", "<|end|>"]
    for k, layer in enumerate(GPT_OSS_LAYERS[:-1]):
        ref = out.hidden_states[layer + 1][0, prefix:]
        assert torch.allclose(features[1, :7, 32 * k : 32 * (k + 1)], ref, atol=1e-4)
    # layer 23 is the last: transformers puts the *normed* output in hidden_states[24]; ours is before the norm
    last = features[1, :7, 96:]
    assert torch.allclose(model.norm(last), out.hidden_states[24][0, prefix:], atol=1e-4)
    assert not torch.allclose(last, out.hidden_states[24][0, prefix:], atol=1e-2)
    assert torch.allclose(features[0, :4], enc.encode(["a red circle"])[0][0], atol=1e-4)  # padding harmless


def test_gpt_oss_custom_layers_and_spec_errors(tiny_gpt_oss, tmp_path):
    enc = load_text_encoder(f"gpt-oss:{tiny_gpt_oss}@0,23")
    assert enc.layers == (0, 23) and enc.encode(["a red circle"])[0].shape == (1, 4, 64)
    assert parse_text_spec("minilm@1,3") == ("minilm", "", (1, 3))
    with pytest.raises(LookupError, match="known: gpt-oss"):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="needs a directory"):
        load_text_encoder("gpt-oss")
    with pytest.raises(FileNotFoundError):
        load_text_encoder(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="out of range"):
        load_text_encoder(f"gpt-oss:{tiny_gpt_oss}@24")
    with pytest.raises(ValueError, match="integers"):
        load_text_encoder("minilm@a")
