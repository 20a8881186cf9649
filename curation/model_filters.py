"""Model filters of `lensforge curate`: one CLIP image-embedding pass feeds the CLIP score and every head.

    scorer = ClipScorer(cfg.models)  # cheap: nothing loads until the first call (ship it to a Ray actor)
    out = scorer(images, alt_texts)  # {"embedding": (N, D), "clip_score": (N,), "aesthetic": (N,) | None, …}
    reason = model_reason(scores_at(out, i), cfg.models)

Weights come from local paths (an open_clip pretrained tag also works for online users, through open_clip's own
loader and cache). A head with no path configured is skipped and its column stays null: never random weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from curation.config import ModelFiltersConfig
from curation.filters import checks, first_reason

MODEL_CHECKS = checks("model")  # clip_score, aesthetic, nsfw, watermark (curation/filters.py's order)
HEADS = ("aesthetic", "nsfw", "watermark")


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor, e.g.
    sac+logos+ava1-l14-linearMSE.pth for ViT-L/14, D = 768): (N, D) L2-normalised image embedding → (N,) score,
    about 1–10, no sigmoid. Same module layout (`layers.{0,2,4,6,7}`) as that .pth, so it loads unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


class ProbeHead(nn.Module):
    """NSFW / watermark probe: (N, D) L2-normalised embedding → (N,) probability.

    `dims` = (D, hidden..., 1): Linear layers `layers.{i}` with ReLU between them and a sigmoid on the last; dims
    (D, 1) is a linear probe. Real weights must be converted to this key layout (`layers.0.weight` (h1, D), …,
    `layers.{k}.weight` (1, h_k), each with its bias); the sizes are read back from the file.
    """

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"probe dims must run from the embedding width to 1, got {dims}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @classmethod
    def dims_of(cls, state: dict[str, torch.Tensor]) -> tuple[int, ...]:
        weights = [state[f"layers.{i}.weight"] for i in range(len(state) // 2)]  # (out, in) each
        return (weights[0].shape[1], *(w.shape[0] for w in weights))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return torch.sigmoid(x).squeeze(-1)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"head weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # a .pth/.pt state dict, no pickled code
    return state.get("state_dict", state)


def load_head(name: str, path: str, dim: int | None = None) -> nn.Module:
    """The `name` head ("aesthetic", "nsfw", "watermark") from a local .safetensors / .pth state dict, in eval mode.
    `dim` (the CLIP embedding width), when given, must match the head's input width."""
    state = _read_state_dict(path)
    if name == "aesthetic":
        head = AestheticHead(state["layers.0.weight"].shape[1])
    else:
        head = ProbeHead(ProbeHead.dims_of(state))
    head.load_state_dict(state, strict=True)
    in_dim = state["layers.0.weight"].shape[1]
    if dim is not None and in_dim != dim:
        raise ValueError(f"{name} head {path} takes {in_dim}-d embeddings but the CLIP model gives {dim}-d")
    return head.eval()


def load_clip(cfg: ModelFiltersConfig, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) through open_clip, from local files alone.

    cfg.clip_model: an open_clip architecture name ("ViT-L-14"), a path to a model-config JSON (registered under
    its file stem), or a directory holding open_clip_config.json and weights (open_clip's "local-dir:").
    cfg.clip_weights: a local checkpoint (.safetensors / .pt / .bin) passed as `pretrained=`, or an open_clip tag.
    """
    import open_clip  # ~3–10 s to import (timm, transformers): only where a model is actually built

    name = _resolve_model_name(open_clip, cfg.clip_model)
    pretrained = None if name.startswith(("local-dir:", "hf-hub:")) else _resolve_weights(open_clip, name, cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _resolve_model_name(open_clip, clip_model: str | None) -> str:
    if clip_model is None:
        raise ValueError("models.clip_model is not set: the model filters are off")
    path = Path(clip_model).expanduser()
    if clip_model.startswith(("local-dir:", "hf-hub:")):
        return clip_model
    if path.is_dir():
        return f"local-dir:{path}"
    if path.is_file():
        return _register_config(open_clip, path)
    if clip_model.replace("/", "-") in open_clip.list_models():
        return clip_model.replace("/", "-")
    if clip_model.endswith(".json") or os.sep in clip_model:
        raise FileNotFoundError(f"CLIP model config not found: {clip_model} (models.clip_model)")
    raise ValueError(f"unknown open_clip architecture {clip_model!r}: give a built-in name or a model-config JSON")


def _resolve_weights(open_clip, name: str, cfg: ModelFiltersConfig) -> str:
    if cfg.clip_weights is None:
        raise ValueError("models.clip_weights is not set: a CLIP with random weights would filter at random")
    path = Path(cfg.clip_weights).expanduser()
    if path.is_file():
        return str(path)
    if cfg.clip_weights in open_clip.list_pretrained_tags_by_model(name):
        return cfg.clip_weights  # online users: open_clip downloads and caches it
    raise FileNotFoundError(
        f"CLIP weights not found: {cfg.clip_weights} (models.clip_weights; not a file, nor an open_clip tag of {name})"
    )


def _register_config(open_clip, path: Path) -> str:
    """Registers a model-config JSON under its file stem (open_clip's registry is global: a stem equal to a built-in
    name shadows it) and returns that name."""
    config = json.loads(path.read_text())
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    if open_clip.get_model_config(path.stem) != config:  # registering rescans every config path: once is enough
        open_clip.add_model_config(path)
    return path.stem


class ClipScorer:
    """Every model-filter score of a batch from one CLIP image pass. Loads lazily on the first call and pickles
    without its model, so it is cheap to construct on the driver and ship to a Ray actor."""

    def __init__(self, cfg: ModelFiltersConfig):
        self.cfg = cfg
        self._loaded = None  # (model, preprocess, tokenizer, heads, device, D) after the first call

    @property
    def enabled(self) -> bool:
        return self.cfg.clip_model is not None

    def __getstate__(self):
        return {"cfg": self.cfg, "_loaded": None}

    def _load(self):
        if self._loaded is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model, preprocess, tokenizer = load_clip(self.cfg, device)
            dim = getattr(model.visual, "output_dim", None)  # D of the image embedding; None for some timm towers
            heads = {}
            for name in HEADS:
                path = getattr(self.cfg, f"{name}_head")
                heads[name] = None if path is None else load_head(name, path, dim).to(device)
            self._loaded = (model, preprocess, tokenizer, heads, device, dim)
        return self._loaded

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], texts: list[str]) -> dict[str, np.ndarray | None]:
        """images: N × (H, W, 3) uint8 RGB; texts: N alt texts ("" or None = none).
        Returns embedding (N, D) float32 L2-normalised, clip_score (N,) cosine(image, text) (NaN where no text),
        aesthetic / nsfw / watermark (N,) float32, or None when that head is not configured (or CLIP is off)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not self.enabled:
            return {"embedding": None, "clip_score": None, **{name: None for name in HEADS}}
        model, preprocess, tokenizer, heads, device, _ = self._load()
        img_emb = self._embed(model.encode_image, [preprocess(Image.fromarray(im)) for im in images], device)  # (N, D)
        has_text = [i for i, t in enumerate(texts) if t and t.strip()]
        clip_score = torch.full((len(images),), math.nan, device=device)
        if has_text:
            tokens = list(tokenizer([texts[i] for i in has_text]))  # M × (context_length,)
            txt_emb = self._embed(model.encode_text, tokens, device)  # (M, D)
            clip_score[has_text] = (img_emb[has_text] * txt_emb).sum(-1)
        out = {"embedding": img_emb, "clip_score": clip_score}
        for name in HEADS:
            out[name] = None if heads[name] is None else heads[name](img_emb).float()
        return {k: None if v is None else v.float().cpu().numpy() for k, v in out.items()}

    def _embed(self, encode, inputs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Batches of cfg.batch_size through `encode`; (N, D) float32, L2-normalised. fp16 autocast on a GPU (the
        precision CLIP filters are usually run at); fp32 on a CPU."""
        chunks = []
        for start in range(0, len(inputs), self.cfg.batch_size):
            batch = torch.stack(inputs[start : start + self.cfg.batch_size]).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                chunks.append(encode(batch).float())
        if not chunks:  # an empty batch: (0, D)
            return torch.empty((0, self._loaded[5] or 0), device=device)
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def scores_at(out: dict[str, np.ndarray | None], i: int) -> dict[str, float | None]:
    """Row i of a ClipScorer output as {check: float or None}; NaN (no alt text) becomes None."""
    row = {}
    for name in MODEL_CHECKS:
        v = None if out.get(name) is None else float(out[name][i])
        row[name] = None if v is None or math.isnan(v) else v
    return row


def model_reason(scores: dict[str, float | None], cfg: ModelFiltersConfig) -> str | None:
    """The first failing check of MODEL_CHECKS, or None. A None or NaN score (filter off, no alt text) never
    rejects."""
    return first_reason("model", scores, cfg)
