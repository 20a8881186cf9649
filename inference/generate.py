"""The text-to-image pipeline: weights + codec + text encoder + the flow sampler → PIL images.

    pipe = Pipeline.load(*resolve_checkpoint(run="runs/demo"), device="cpu")
    images = pipe.generate(["a red circle top left"], width=32, height=32, steps=20, cfg=5.0, seeds=[0])

Sizes: multiples of 16, area at most 1440² (Lens); `size_for_aspect` maps Lens's aspect presets to sizes.
"""

from __future__ import annotations

import contextlib
import math

import torch
from PIL import Image

from inference.checkpoint import CheckpointSpec, load_model
from inference.codecs import Codec, load_codec
from inference.flow import RectifiedFlow, initial_noise
from inference.mmdit import MMDiT
from inference.text import TextEncoder, load_text_encoder

# Lens samples 1:2 … 2:1 (its 9 bucket ratios, width:height) up to 1440² pixels.
ASPECTS = {"1:2": (1, 2), "9:16": (9, 16), "2:3": (2, 3), "3:4": (3, 4), "1:1": (1, 1),
           "4:3": (4, 3), "3:2": (3, 2), "16:9": (16, 9), "2:1": (2, 1)}  # fmt: skip
MAX_AREA = 1440 * 1440
MULTIPLE = 16


def validate_size(width: int, height: int) -> tuple[int, int]:
    if width <= 0 or height <= 0 or width % MULTIPLE or height % MULTIPLE:
        raise ValueError(f"size {width}x{height}: width and height must be positive multiples of {MULTIPLE}")
    if width * height > MAX_AREA:
        raise ValueError(f"size {width}x{height}: area {width * height} is above the cap 1440² = {MAX_AREA}")
    return width, height


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' (width × height) → (1024, 768), validated."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return validate_size(int(w), int(h))


def size_for_aspect(aspect: str, area: int) -> tuple[int, int]:
    """The size of ratio `aspect` (e.g. '16:9') nearest to `area` pixels, sides multiples of 16."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
    rw, rh = ASPECTS[aspect]
    scale = math.sqrt(area / (rw * rh))
    width = max(MULTIPLE, round(rw * scale / MULTIPLE) * MULTIPLE)
    height = max(MULTIPLE, round(rh * scale / MULTIPLE) * MULTIPLE)
    while width * height > MAX_AREA:  # rounding up may cross the cap
        width, height = width - MULTIPLE * (rw >= rh), height - MULTIPLE * (rh > rw)
    return validate_size(width, height)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → 8-bit RGB images."""
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


class Pipeline:
    def __init__(self, model: MMDiT, codec: Codec, text_encoder: TextEncoder, device="cpu", autocast=None):
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
        self.autocast = autocast  # e.g. torch.bfloat16 on a GPU

    @classmethod
    def load(cls, weights, spec: CheckpointSpec, device="cpu", autocast=None) -> "Pipeline":
        model = load_model(weights, spec, device=device)
        text = load_text_encoder(spec.text_encoder, device=device, dtype=autocast or torch.float32)  # 20 B: bf16
        return cls(model, load_codec(spec.codec, device=device), text, device=device, autocast=autocast)

    def _context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def latents(self, prompts, width, height, steps=20, cfg=5.0, seeds=None, negative="") -> torch.Tensor:
        """Sample normalized latents for one batch of prompts (one image each)."""
        self.codec.check_size(width, height)
        c, f, p = self.model.config.in_channels, self.codec.factor, self.model.config.patch
        if (height // f) % p or (width // f) % p:
            raise ValueError(f"{width}x{height}: latent sides must be multiples of the patch {p}")
        seeds = list(range(len(prompts))) if seeds is None else seeds
        noise = initial_noise((len(prompts), c, height // f, width // f), seeds, device=self.device)
        text, mask = (t.to(self.device) for t in self.text_encoder.encode(list(prompts)))
        neg = tuple(t.to(self.device) for t in self.text_encoder.encode([negative])) if cfg != 1.0 else None
        with self._context():
            return self.flow.sample(self.model, noise, text, mask, steps=steps, cfg=cfg, neg=neg).float()

    @torch.no_grad()
    def generate(self, prompts, width, height, steps=20, cfg=5.0, seeds=None, negative="", batch_size=4):
        """PIL images, one per prompt (repeat a prompt for several images); image i uses seeds[i]."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        images = []
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            z = self.latents(prompts[part], width, height, steps, cfg, seeds[part], negative)
            with self._context():
                images.extend(to_pil(self.codec.decode(z)))
        return images
