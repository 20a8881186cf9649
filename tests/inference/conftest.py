"""Tiny models written to disk and loaded back by path, as real weights are: no hub, no network."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GPT_OSS_SPECIALS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"]
WORDS = "a red circle top left blue square big green triangle on the right of small yellow"


def build_tokenizer(out_dir, extra_text: str):
    """A word-level tokenizer over the template's and the tests' words, with GPT-OSS's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", extra_text + " " + WORDS)) - set(GPT_OSS_SPECIALS))
    vocab = {tok: i for i, tok in enumerate(GPT_OSS_SPECIALS + ["[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": GPT_OSS_SPECIALS[1:]})
    tok.save_pretrained(str(out_dir))
    return tok


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory):
    """A 24-layer, 32-wide random GPT-OSS + tokenizer on disk. 24 layers so that Lens's own layers (5, 11, 17,
    23) are exercised, 23 being the last, whose `hidden_states` entry transformers replaces by the normed one."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from inference.text import GPT_OSS_TEMPLATE

    out = tmp_path_factory.mktemp("gpt_oss")
    tok = build_tokenizer(out, GPT_OSS_TEMPLATE)
    cfg = GptOssConfig(
        num_hidden_layers=24, hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tok),
        sliding_window=8, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    GptOssForCausalLM(cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random AutoencoderKLFlux2 (4 levels → /8, 32 latent channels, 8-wide convs) with non-trivial BN stats."""
    import torch
    from diffusers import AutoencoderKLFlux2

    out = tmp_path_factory.mktemp("flux2_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             latent_channels=32, sample_size=64)
    vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
    vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.1)
    vae.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def minilm():
    from inference.text import load_text_encoder

    return load_text_encoder("minilm")
