"""Tiny models written to disk the way real ones are laid out, for tests: a random GPT-OSS with a word-level
tokenizer and a harmony-style chat template, a random FLUX.2 VAE, and a Lens release root holding both.

    save_tiny_gpt_oss(out)                    # GPT-OSS's own model identity: the prompt starts after 86 tokens
    save_tiny_gpt_oss(out, IDENTITY_97)       # a longer identity: exactly Lens's 97 tokens before the prompt
    save_tiny_lens_release(out, layers=(1, 4, 9, 23))

Test modules import it as `tests.inference.tiny_models` (pytest resolves it from the rootdir); the fixtures of
tests/inference/conftest.py wrap it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

GPT_OSS_SPECIALS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"]
WORDS = "a red circle top left blue square big green triangle on the right of small yellow"
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
IDENTITY_97 = IDENTITY + " You look at images and you help people describe them."  # + 11 tokens
PREFIX_TOKENS = {IDENTITY: 86, IDENTITY_97: 97}  # word-level tokens of the chat before the prompt

# Harmony, the structure of GPT-OSS's own chat template for the turns Lens renders (no tools, no tool calls):
# a system block (identity, knowledge cutoff, the date from strftime_now, reasoning effort, channels), the first
# message when it is a system message as a developer "# Instructions" block, user turns, and assistant turns as a
# final channel; the last assistant turn of a finished chat shows its thinking as an analysis channel first and
# ends with <|return|>.
HARMONY_TEMPLATE = """
{%- if model_identity is not defined -%}{%- set model_identity = "@IDENTITY@" -%}{%- endif -%}
{%- if reasoning_effort is not defined -%}{%- set reasoning_effort = "medium" -%}{%- endif -%}
{{- "<|start|>system<|message|>" + model_identity + "\\n" -}}
{{- "Knowledge cutoff: 2024-06\\n" -}}
{{- "Current date: " + strftime_now("%Y-%m-%d") + "\\n\\n" -}}
{{- "Reasoning: " + reasoning_effort + "\\n\\n" -}}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>" -}}
{%- if messages[0].role in ["system", "developer"] -%}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + messages[0].content + "\\n\\n<|end|>" -}}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message.role == "user" -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}
    {%- elif message.role == "assistant" and loop.last and not add_generation_prompt -%}
        {%- if message.thinking is defined -%}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" -}}
        {%- endif -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" -}}
    {%- elif message.role == "assistant" -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}
"""


def harmony_template(identity: str = IDENTITY) -> str:
    return HARMONY_TEMPLATE.replace("@IDENTITY@", identity).strip()


def build_tokenizer(out_dir, extra_text: str, chat_template: str | None = None):
    """A word-level tokenizer over `extra_text`'s and the tests' words, numbers (any date), and GPT-OSS's special
    tokens, with `chat_template` stored in it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    numbers = [f"{i:02d}" for i in range(100)] + [str(y) for y in range(2000, 2100)]
    template = (chat_template or "").replace("\\n", " ").replace('"', " ")  # the words it renders, and more
    found = re.findall(r"\w+|[^\w\s]+", f"{extra_text} {WORDS} {template}")
    words = sorted(set(found + numbers) - set(GPT_OSS_SPECIALS))
    vocab = {tok: i for i, tok in enumerate(GPT_OSS_SPECIALS + ["[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|return|>")
    tok.add_special_tokens({"additional_special_tokens": GPT_OSS_SPECIALS[1:]})
    tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    return tok


def save_tiny_gpt_oss(out, identity: str = IDENTITY, seed: int = 0, tokenizer_dir=None) -> Path:
    """A 24-layer, 32-wide random GPT-OSS at `out` and its tokenizer (at `tokenizer_dir`, default `out`). 24
    layers so that Lens's own layers (5, 11, 17, 23) are exercised, 23 being the last, whose `hidden_states` entry
    transformers replaces by the normed one."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from inference.text import LENS_SYSTEM, LENS_THINKING

    out = Path(out)
    template = harmony_template(identity)
    tok = build_tokenizer(tokenizer_dir or out, f"{LENS_SYSTEM} {LENS_THINKING}", template)
    cfg = GptOssConfig(
        num_hidden_layers=24, hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tok),
        sliding_window=8, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    GptOssForCausalLM(cfg).save_pretrained(str(out))
    return out


def save_tiny_vae(out) -> Path:
    """A random AutoencoderKLFlux2 (4 levels → /8, 32 latent channels, 8-wide convs) with non-trivial BN stats."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             latent_channels=32, sample_size=64)
    vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
    vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.1)
    vae.save_pretrained(str(out))
    return Path(out)


def save_tiny_lens_release(out, layers=(1, 4, 9, 23), vae=None) -> Path:
    """A Lens release root as diffusers lays it out: model_index.json, text_encoder/ (GPT-OSS), tokenizer/,
    transformer/config.json (only `selected_layer_index` is read from it) and vae/ (a copy of `vae` when given)."""
    out = Path(out)
    save_tiny_gpt_oss(out / "text_encoder", IDENTITY_97, tokenizer_dir=out / "tokenizer")
    (out / "transformer").mkdir(parents=True)
    (out / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "LensTransformer2DModel", "selected_layer_index": list(layers)}))
    if vae is not None:
        shutil.copytree(vae, out / "vae")
    else:
        save_tiny_vae(out / "vae")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "LensPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LensGptOssEncoder"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "LensTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}))
    return out
