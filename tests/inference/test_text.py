"""Text encoders: MiniLM and any HF encoder, and GPT-OSS as Lens's released pipeline runs it (the tokenizer's chat
template, the date, 512 tokens with the template, the 97-token offset, the suffix kept, layers before the final
norm, a Lens release root), and identities computed without loading that match the loaded encoders'."""

import datetime
import logging

import pytest
import torch

from inference.text import (
    GPT_OSS_LAYERS,
    LENS_OFFSET,
    LENS_SYSTEM,
    LENS_THINKING,
    describe_text_encoder,
    load_text_encoder,
    parse_text_spec,
    weights_path,
)
from tests.inference.tiny_models import IDENTITY, IDENTITY_97, PREFIX_TOKENS

DATE = "2025-01-02"
# What the chat template renders for one prompt (cut at <|return|>): system block, Lens's system message as the
# developer's instructions, the prompt as the user turn, then the assistant's thinking and an empty final turn.
EXPECTED_CHAT = (
    f"<|start|>system<|message|>{IDENTITY_97}\nKnowledge cutoff: 2024-06\nCurrent date: {DATE}\n\n"
    "Reasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    f"message.<|end|><|start|>developer<|message|># Instructions\n\n{LENS_SYSTEM}\n\n<|end|>"
    "<|start|>user<|message|>{prompt}<|end|>"
    f"<|start|>assistant<|channel|>analysis<|message|>{LENS_THINKING}<|end|>"
    "<|start|>assistant<|channel|>final<|message|>"
)
SUFFIX = ["<|end|>", "<|start|>", "assistant", "<|channel|>", "analysis", "<|message|>", *LENS_THINKING[:-1].split(),
          ".", "<|end|>", "<|start|>", "assistant", "<|channel|>", "final", "<|message|>"]  # 22 tokens


@pytest.fixture(scope="module")
def lens97(tiny_gpt_oss_97):
    return load_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}", date=DATE)


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
    enc = load_text_encoder(f"hf:{weights_path('minilm')}")
    assert enc.layers == (5,) and enc.feature_dim == 384
    ours, mask = enc.encode(["a red circle"])
    assert torch.allclose(ours, minilm.encode(["a red circle"])[0][..., 384:], atol=1e-5)
    assert minilm.identity()["layers"] == [2, 5] and minilm.identity()["max_tokens"] == 256
    assert minilm.identity()["template"] is None


def test_empty_prompt_has_no_tokens_and_padding_is_harmless(minilm):
    f, m = minilm.encode(["", "a red circle", ""])
    assert not m[0].any() and not m[2].any() and m[1].sum() == 5
    assert f[0].abs().sum() == 0
    alone, alone_mask = minilm.encode(["a red circle"])
    assert torch.allclose(f[1, : alone.shape[1]], alone[0], atol=1e-5)
    f, m = minilm.encode(["", " "])
    assert f.shape == (2, 0, 768) and m.shape == (2, 0)


def test_gpt_oss_renders_with_the_tokenizers_own_chat_template(lens97):
    assert lens97.render("a red circle") == EXPECTED_CHAT.replace("{prompt}", "a red circle")
    tok = lens97.tokenizer
    ids = lens97._inputs(["a red circle"])["input_ids"][0].tolist()
    assert ids == tok(EXPECTED_CHAT.replace("{prompt}", "a red circle"))["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert lens97.prefix_tokens == LENS_OFFSET == PREFIX_TOKENS[IDENTITY_97] == 97
    assert tokens[:3] == ["<|start|>", "system", "<|message|>"]
    assert tokens[94:97] == ["<|start|>", "user", "<|message|>"]
    assert tokens[97:] == ["a", "red", "circle", *SUFFIX] and "[UNK]" not in tokens


def test_the_date_is_a_parameter_of_the_render_and_the_identity(tiny_gpt_oss_97, lens97):
    other = load_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}", date="2031-12-30")
    assert "Current date: 2031-12-30\n" in other.render("a") and f"Current date: {DATE}\n" in lens97.render("a")
    assert lens97.identity()["template"]["date"] == DATE and other.identity()["template"]["date"] == "2031-12-30"
    assert {k: v for k, v in lens97.identity()["template"].items() if k != "date"} == {
        k: v for k, v in other.identity()["template"].items() if k != "date"}
    today = datetime.date.today().isoformat()  # None = today, as Lens's pipeline at inference
    assert f"Current date: {today}\n" in load_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}").render("a")
    with pytest.raises(ValueError, match="not YYYY-MM-DD"):
        load_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}", date="30/12/2031")


def test_gpt_oss_features_are_the_layers_after_the_offset_suffix_included(lens97):
    assert lens97.layers == GPT_OSS_LAYERS and lens97.dim == 32 and lens97.feature_dim == 128
    prompts = ["a red circle", "big green triangle on the right", ""]
    features, mask = lens97.encode(prompts)
    assert mask.sum(1).tolist() == [3 + 22, 6 + 22, 0]  # the prompt's words and the template's suffix
    # reference: the whole chat through the model, hidden_states[i + 1] = after layer i, from token 97 on
    inputs = lens97.tokenizer(lens97.render(prompts[1]), return_tensors="pt")
    out = lens97.model(**inputs, output_hidden_states=True)
    for k, layer in enumerate(GPT_OSS_LAYERS[:-1]):
        ref = out.hidden_states[layer + 1][0, LENS_OFFSET:]
        assert torch.allclose(features[1, :28, 32 * k : 32 * (k + 1)], ref, atol=1e-5)
    # layer 23 is the last: transformers puts the *normed* output in hidden_states[24]; ours is before the norm
    last = features[1, :28, 96:]
    assert torch.allclose(lens97.model.norm(last), out.hidden_states[24][0, LENS_OFFSET:], atol=1e-4)
    assert not torch.allclose(last, out.hidden_states[24][0, LENS_OFFSET:], atol=1e-2)
    # right padding within a batch is harmless (causal attention); the empty prompt has no tokens
    alone = lens97.encode(["a red circle"])[0][0]
    assert torch.allclose(features[0, :25], alone, atol=1e-5)
    assert features[0, 25:].abs().sum() == 0 and features[2].abs().sum() == 0


def test_512_tokens_include_the_template_and_shorter_sequences_give_no_features(lens97):
    phrase = "a red circle on the left of big green triangle".split()
    long = " ".join(phrase * 60)  # 600 words
    features, mask = lens97.encode([long, "a"])
    assert mask.sum(1).tolist() == [512 - LENS_OFFSET, 1 + 22]  # the long one lost its tail and the suffix
    assert features.shape == (2, 415, 128)
    ids = lens97._inputs([long, "a"])["input_ids"]  # the last token kept is prompt word 511 − 97
    assert ids.shape[1] == 512 and lens97.tokenizer.convert_ids_to_tokens(ids[0, -1:].tolist()) == [phrase[414 % 10]]
    f, m = lens97.encode(["", " "])
    assert f.shape == (2, 0, 128) and m.shape == (2, 0)
    lens97.max_tokens = 90  # every sequence ends before the offset: zero-length features, as Lens's pipeline
    try:
        f, m = lens97.encode(["a red circle"])
    finally:
        lens97.max_tokens = 512
    assert f.shape == (1, 0, 128) and m.shape == (1, 0)


def test_another_prefix_length_warns_once_at_load_and_keeps_the_offset(tiny_gpt_oss, caplog):
    with caplog.at_level(logging.WARNING, logger="inference.text"):
        enc = load_text_encoder(f"gpt-oss:{tiny_gpt_oss}", date=DATE)
    (record,) = caplog.records
    assert "86 tokens, not Lens's 97: the first 11 prompt tokens are dropped" in record.getMessage()
    assert enc.prefix_tokens == PREFIX_TOKENS[IDENTITY] == 86
    words = "a red circle top left blue square big green triangle on the right of small yellow".split()
    _, mask = enc.encode([" ".join(words)])
    ids = enc.tokenizer(enc.render(" ".join(words)))["input_ids"]
    assert enc.tokenizer.convert_ids_to_tokens(ids[97:102]) == words[11:]  # features start at the 12th word
    assert mask.sum() == len(words) - 11 + 22


def test_a_lens_release_root_reads_its_layers_from_the_transformer_config(tiny_lens_release, tmp_path):
    spec = f"gpt-oss:{tiny_lens_release}"
    enc = load_text_encoder(spec, date=DATE)
    assert enc.layers == (1, 4, 9, 23) and enc.prefix_tokens == 97
    assert weights_path(spec) == tiny_lens_release / "text_encoder"
    assert enc.render("a") == EXPECTED_CHAT.replace("{prompt}", "a")  # the tokenizer from tokenizer/
    assert load_text_encoder(f"{spec}@5,11", date=DATE).layers == (5, 11)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    (broken / "text_encoder").mkdir()
    with pytest.raises(FileNotFoundError, match="without tokenizer/"):
        load_text_encoder(f"gpt-oss:{broken}")


def test_identities_from_the_config_files_match_the_loaded_encoders(minilm, lens97, tiny_gpt_oss_97,
                                                                    tiny_lens_release):
    assert describe_text_encoder("minilm") == minilm.identity()
    assert describe_text_encoder(f"hf:{weights_path('minilm')}@1") == load_text_encoder(
        f"hf:{weights_path('minilm')}@1").identity()
    assert describe_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}", DATE) == lens97.identity() == {
        "text_encoder": f"gpt-oss:{tiny_gpt_oss_97}", "layers": [5, 11, 17, 23], "dim": 32, "max_tokens": 512,
        "template": {"chat": "the tokenizer's chat template", "system": LENS_SYSTEM, "thinking": LENS_THINKING,
                     "date": DATE, "cut_at": "<|return|>", "offset": 97}}
    assert describe_text_encoder(f"gpt-oss:{tiny_lens_release}", DATE)["layers"] == [1, 4, 9, 23]


def test_the_forward_stops_after_the_highest_chosen_layer(tiny_gpt_oss_97):
    enc = load_text_encoder(f"gpt-oss:{tiny_gpt_oss_97}@0,3", date=DATE)
    calls = []
    handle = enc.stack[4].register_forward_hook(lambda *_: calls.append(1))
    try:
        features, _ = enc.encode(["a red circle"])
    finally:
        handle.remove()
    assert features.shape == (1, 25, 64) and not calls


def test_spec_errors(tiny_gpt_oss, tmp_path):
    assert parse_text_spec("minilm@1,3") == ("minilm", "", (1, 3))
    with pytest.raises(LookupError, match="known: gpt-oss"):
        load_text_encoder("t5")
    with pytest.raises(ValueError, match="needs a directory"):
        load_text_encoder("gpt-oss")
    with pytest.raises(FileNotFoundError):
        load_text_encoder(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="out of range"):
        load_text_encoder(f"gpt-oss:{tiny_gpt_oss}@24")
    with pytest.raises(ValueError, match="out of range"):
        describe_text_encoder(f"gpt-oss:{tiny_gpt_oss}@24")
    with pytest.raises(ValueError, match="integers"):
        load_text_encoder("minilm@a")
