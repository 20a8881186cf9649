"""The text-to-image pipeline: weights + codec + text encoder + the flow sampler → PIL images.

    pipe = Pipeline.from_path("runs/demo")                      # a run, step, Lens release root, transformer/, file
    pipe = Pipeline.from_path("/models/Lens", device="cuda", dtype=torch.bfloat16, offload=True)
    images = pipe.generate(["a red circle top left"], width=32, height=32, steps=20, cfg=5.0, seeds=[0])

Sampling is the released Lens pipeline's, step for step (inference/flow.py): noise drawn per seed in its token
layout, the same σ schedule, timesteps, CFG rescale and Euler update, the same latent denormalization and 8-bit
conversion for FLUX.2, so a seed gives the same image (padded text aside: lensforge masks it in every block).
Sizes: multiples of 16, at most Lens's largest (2080 × 1040); `size_for_aspect` gives the release's own tables for
base 1024 and 1440 and rounds by area for other bases.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from PIL import Image

from inference.checkpoint import CheckpointSpec, DenoiserSource, describe_denoiser, load_source
from inference.codecs import Codec, load_codec
from inference.flow import RectifiedFlow, check_guidance, initial_noise, pad_text
from inference.mmdit import MMDiT
from inference.text import TextEncoder, load_text_encoder

# Lens samples 1:2 … 2:1 (its 9 bucket ratios, width:height).
ASPECTS = {"1:2": (1, 2), "9:16": (9, 16), "2:3": (2, 3), "3:4": (3, 4), "1:1": (1, 1),
           "4:3": (4, 3), "3:2": (3, 2), "16:9": (16, 9), "2:1": (2, 1)}  # fmt: skip
# The release's sizes per base (its pipeline's RESOLUTION_BUCKETS), as (width, height).
RELEASE_SIZES = {
    1024: {"1:2": (736, 1472), "9:16": (768, 1376), "2:3": (832, 1248), "3:4": (864, 1152), "1:1": (1024, 1024),
           "4:3": (1152, 864), "3:2": (1248, 832), "16:9": (1376, 768), "2:1": (1472, 736)},
    1440: {"1:2": (1040, 2080), "9:16": (1088, 1936), "2:3": (1168, 1760), "3:4": (1216, 1616), "1:1": (1440, 1440),
           "4:3": (1616, 1216), "3:2": (1760, 1168), "16:9": (1936, 1088), "2:1": (2080, 1040)},
}
MAX_AREA = 2080 * 1040  # the largest size in those tables
MULTIPLE = 16


def validate_size(width: int, height: int) -> tuple[int, int]:
    if width <= 0 or height <= 0 or width % MULTIPLE or height % MULTIPLE:
        raise ValueError(f"size {width}x{height}: width and height must be positive multiples of {MULTIPLE}")
    if width * height > MAX_AREA:
        raise ValueError(f"size {width}x{height}: area {width * height} is above the cap 2080×1040 = {MAX_AREA}")
    return width, height


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' (width × height) → (1024, 768), validated."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return validate_size(int(w), int(h))


def size_for_aspect(aspect: str, base: int) -> tuple[int, int]:
    """(width, height) of ratio `aspect` (e.g. '16:9') at base side `base`: the release's table for 1024 and 1440,
    else the size nearest to base² pixels with sides multiples of 16."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
    if base in RELEASE_SIZES:
        return RELEASE_SIZES[base][aspect]
    if base < MULTIPLE or base * base > MAX_AREA:
        raise ValueError(f"base size {base}: between {MULTIPLE} and 1440 (or 1024 / 1440 for Lens's tables)")
    rw, rh = ASPECTS[aspect]
    scale = math.sqrt(base * base / (rw * rh))
    width = max(MULTIPLE, round(rw * scale / MULTIPLE) * MULTIPLE)
    height = max(MULTIPLE, round(rh * scale / MULTIPLE) * MULTIPLE)
    while width * height > MAX_AREA:  # rounding up may cross the cap
        width, height = width - MULTIPLE * (rw >= rh), height - MULTIPLE * (rh > rw)
    return validate_size(width, height)


def to_pil(images: torch.Tensor, rounding: str = "round") -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → 8-bit RGB images; rounding "floor" truncates as the Lens pipeline does."""
    if rounding == "floor":  # the Lens pipeline's `_to_pil`: in the decoder's own dtype, truncated
        arr = ((images.clamp(-1.0, 1.0) + 1.0) * (255.0 / 2.0)).to(torch.uint8)
    else:
        arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def text_spec_with_layers(spec: CheckpointSpec) -> str:
    """The spec's text encoder, its layers spelled out when the spec records them apart (a bare transformer)."""
    if spec.text_layers and "@" not in spec.text_encoder.rpartition(":")[2]:
        return f"{spec.text_encoder}@{','.join(str(i) for i in spec.text_layers)}"
    return spec.text_encoder


class Pipeline:
    """Denoiser + codec + text encoder. `offload`: all three wait on the CPU and each visits the device only for
    its own part (encode, then sample, then decode), so the device holds the largest of them, not their sum."""

    def __init__(self, model: MMDiT, codec: Codec, text_encoder: TextEncoder, device="cpu", autocast=None,
                 noise_layout: str = "tokens", offload: bool = False, text_device=None):
        cfg = model.config
        if codec.channels != cfg.in_channels:
            raise ValueError(f"codec {codec.spec} gives {codec.channels} channels; model wants {cfg.in_channels}")
        if text_encoder.dim != cfg.text_dim or len(text_encoder.layers) != cfg.text_layers:
            raise ValueError(
                f"text encoder {text_encoder.spec} gives {len(text_encoder.layers)} × {text_encoder.dim}; "
                f"model wants {cfg.text_layers} × {cfg.text_dim}"
            )
        self.model, self.codec, self.text_encoder = model, codec, text_encoder
        self.flow = RectifiedFlow(prediction=cfg.prediction)
        self.device = torch.device(device)
        self.autocast = autocast  # e.g. torch.bfloat16 on a GPU over fp32 weights
        self.noise_layout, self.offload = noise_layout, offload
        self.text_device = torch.device(text_device) if text_device is not None else self.device  # where it encodes
        self.dtype = next(model.parameters()).dtype  # the model's own: inputs are cast to it (bf16 weights)

    @classmethod
    def load(cls, weights, spec: CheckpointSpec, device="cpu", autocast=None, **kwargs) -> "Pipeline":
        """A lensforge weights file and its spec (`inference.checkpoint.resolve_checkpoint`), fp32 weights."""
        source = DenoiserSource("lensforge", (Path(weights),), "", spec)
        return cls.from_source(source, device=device, dtype=torch.float32, autocast=autocast, **kwargs)

    @classmethod
    def from_path(cls, path, device="cpu", dtype=None, prefer_ema: bool = True, **kwargs) -> "Pipeline":
        """Anything `inference.checkpoint.describe_denoiser` reads: a run, a step, a Lens release, a file."""
        return cls.from_source(describe_denoiser(path, prefer_ema), device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_source(cls, source: DenoiserSource, device="cpu", dtype=None, autocast=None, codec=None,
                    text_encoder=None, date=None, offload=False, noise_layout="tokens",
                    text_device=None) -> "Pipeline":
        """dtype: the weights' (None = as stored); codec / text_encoder: specs that replace the source's (needed
        for a bare transformer); date: the chat template's date line (None: the one the checkpoint's features
        were made with, else today's, as the Lens pipeline); text_device: where the text encoder runs (default
        `device`; "cpu" keeps a text encoder too big for the GPU off it)."""
        spec = source.spec.model_copy(update={k: v for k, v in (("codec", codec), ("text_encoder", text_encoder))
                                              if v is not None})
        if spec.codec is None or spec.text_encoder is None:
            raise ValueError(f"{source.files[0]}: a bare transformer names no codec or text encoder; give both "
                             "(e.g. --codec flux2:LENS_DIR/vae --text-encoder gpt-oss:LENS_DIR)")
        device = torch.device(device)
        home = torch.device("cpu") if offload else device  # where the weights wait between uses
        model = load_source(source, dtype=dtype, device=home)
        compute = autocast or next(model.parameters()).dtype  # the encoders compute as the denoiser does
        text_device = torch.device(text_device) if text_device is not None else device
        text = load_text_encoder(text_spec_with_layers(spec), device=torch.device("cpu") if offload else text_device,
                                 dtype=compute, date=date or spec.text_date)
        return cls(model, load_codec(spec.codec, device=home, dtype=compute), text, device=device,
                   autocast=autocast, noise_layout=noise_layout, offload=offload, text_device=text_device)

    def _context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @contextlib.contextmanager
    def visit(self, module: torch.nn.Module | None, device=None):
        """With `offload`, `module` on `device` (the pipeline's) for the block's duration, then back on the CPU."""
        device = device or self.device
        if not self.offload or module is None or device.type == "cpu":
            yield
            return
        module.to(device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode(self, prompts: list[str], batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each prompt's (1, L, K·D) features and (1, L) mask on the model's device, L its own length."""
        out = []
        with self.visit(getattr(self.text_encoder, "model", None), self.text_device):
            for start in range(0, len(prompts), batch_size):
                features, mask = self.text_encoder.encode(list(prompts[start:start + batch_size]))
                for f, m in zip(features, mask):
                    n = int(m.sum())  # right-padded: the real tokens come first
                    out.append((f[None, :n].to(self.device, self.dtype), m[None, :n].to(self.device)))
        return out

    def step_flops(self, width: int, height: int, cfg: float = 5.0) -> float:
        """Forward FLOPs of one sampling step for one image: about 2 · parameters · image tokens, × 2 with CFG
        (both halves run); attention and the text tokens are left out, so it is a lower bound at large sizes."""
        tokens = (width // self.codec.factor // self.model.config.patch) * (
            height // self.codec.factor // self.model.config.patch)
        return 2.0 * sum(p.numel() for p in self.model.parameters()) * tokens * (1 if cfg == 1.0 else 2)

    def latents(self, prompts, width, height, steps=20, cfg=5.0, seeds=None, negative="", texts=None, neg=None,
                on_step=None):
        """Sample normalized latents for one batch of prompts (one image each); `texts`/`neg`: already encoded;
        `on_step()` after every sampling step."""
        self.codec.check_size(width, height)
        c, f, p = self.model.config.in_channels, self.codec.factor, self.model.config.patch
        if (height // f) % p or (width // f) % p:
            raise ValueError(f"{width}x{height}: latent sides must be multiples of the patch {p}")
        seeds = list(range(len(prompts))) if seeds is None else seeds
        noise = initial_noise((len(prompts), c, height // f, width // f), seeds, device=self.device,
                              layout=self.noise_layout, patch=p, dtype=self.dtype)
        texts = texts or self.encode(prompts)
        text, mask = pad_text([t for t, _ in texts], [m for _, m in texts])
        if cfg != 1.0 and neg is None:
            neg = self.encode([negative])[0]
        with self._context():
            return self.flow.sample(self.model, noise, text, mask, steps=steps, cfg=cfg,
                                    neg=neg if cfg != 1.0 else None, on_step=on_step)

    @torch.no_grad()
    def generate(self, prompts, width, height, steps=20, cfg=5.0, seeds=None, negative="", batch_size=4,
                 on_step=None):
        """PIL images, one per prompt (repeat a prompt for several images); image i uses seeds[i]. `on_step()` is
        called after every sampling step of every batch (steps × ⌈len(prompts) / batch_size⌉ calls)."""
        check_guidance(cfg)  # before anything is encoded
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        unique = list(dict.fromkeys(prompts + ([negative] if cfg != 1.0 else [])))
        encoded = dict(zip(unique, self.encode(unique)))  # each text once, then the encoder may leave the device
        neg = encoded[negative] if cfg != 1.0 else None
        latents = []
        with self.visit(self.model):
            for start in range(0, len(prompts), batch_size):
                part = slice(start, start + batch_size)
                latents.append(self.latents(prompts[part], width, height, steps, cfg, seeds[part], negative,
                                            texts=[encoded[p] for p in prompts[part]], neg=neg, on_step=on_step))
        images = []
        with self.visit(getattr(self.codec, "vae", None)), self._context():
            for z in latents:
                images.extend(to_pil(self.codec.decode(z), self.codec.rounding))
        return images
