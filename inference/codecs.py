"""Latent codecs: images ↔ the normalized latents the denoiser sees. Latent normalization lives here and only here.

    codec = load_codec("pixel")                 # lossless pixel-unshuffle, CPU demos
    codec = load_codec("flux2:/models/flux2-vae")   # FLUX.2 VAE (diffusers.AutoencoderKLFlux2), Lens's codec
    z = codec.encode(images)                    # (B, 3, H, W) in [-1, 1] → (B, C, H/f, W/f), ~unit variance
    images = codec.decode(z)

Spec strings: `pixel` (factor 4), `pixel:F`, `flux2:PATH`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F


class Codec(ABC):
    spec: str  # how to build it again: load_codec(codec.spec)
    channels: int  # latent channels
    factor: int  # pixels per latent cell, each side
    multiple: int  # image sides must be multiples of this
    rounding = "round"  # decoded [-1, 1] → 8 bits: "round", or "floor" (what the Lens pipeline does for FLUX.2)

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → normalized latents (B, channels, H/factor, W/factor)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents → (B, 3, H, W), nominally in [-1, 1] (not clamped)."""

    def identity(self) -> dict:
        """What a latent cache must match (training's `encoders.json`)."""
        return {"codec": self.spec, "channels": self.channels, "factor": self.factor}

    def check_size(self, width: int, height: int) -> None:
        if width % self.multiple or height % self.multiple:
            raise ValueError(f"{width}x{height}: codec {self.spec} needs sides that are multiples of {self.multiple}")


class PixelCodec(Codec):
    """Pixel-unshuffle by `factor` (factor² · 3 channels), times a fixed scale: exact round trip in fp32."""

    scale = 1.0  # pixels in [-1, 1] already have the order of unit variance; a power of two keeps it exact

    def __init__(self, factor: int = 4):
        self.factor = self.multiple = factor
        self.channels = 3 * factor * factor
        self.spec = "pixel" if factor == 4 else f"pixel:{factor}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scale, self.factor)


def patchify_2x2(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2), channel c·4 + dy·2 + dx, as FLUX.2's `_patchify_latents`."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    return z.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class Flux2Codec(Codec):
    """FLUX.2's VAE. Lens normalizes the 2×2-patchified latent (128 channels) with the VAE's BatchNorm running
    statistics; the result is handed on unpatchified (32 channels at 1/8) and the denoiser's own patch-2 embedding
    (same channel order) rebuilds exactly those 128-value tokens."""

    rounding = "floor"

    def __init__(self, path: str | Path, device=None, dtype: torch.dtype = torch.float32, vae=None):
        """`vae`: an AutoencoderKLFlux2 already in memory (then `path` only names it in the spec)."""
        if vae is None:
            from diffusers import AutoencoderKLFlux2  # heavy import, only for this codec

            if not Path(path).is_dir():
                raise FileNotFoundError(f"FLUX.2 VAE directory not found: {path}")
            vae = AutoencoderKLFlux2.from_pretrained(str(path), torch_dtype=dtype).to(device)
        self.vae = vae.eval().requires_grad_(False)
        self.spec = f"flux2:{path}"
        self.channels, self.factor, self.multiple = flux2_geometry(self.vae.config)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, 32, h, w) → normalized (B, 32, h, w)."""
        zp = patchify_2x2(z)
        mean, std = self._stats(zp)
        return unpatchify_2x2((zp - mean) / std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """As the Lens pipeline's `_decode`: x / (1/std) − (−mean), the factors formed in the VAE's dtype."""
        bn, zp = self.vae.bn, patchify_2x2(z)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        shift = (-bn.running_mean.view(1, -1, 1, 1)).to(zp.device, zp.dtype)
        scale = (1.0 / std).to(zp.device, zp.dtype)
        return unpatchify_2x2(zp / scale - shift)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(images.to(dtype)).latent_dist
        return self.normalize(posterior.mode())  # the mean, as the FLUX.2 pipeline's sample_mode="argmax"

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(self.denormalize(latents.to(dtype)), return_dict=False)[0]

    def identity(self) -> dict:
        return {**super().identity(), "batch_norm_eps": self.vae.config.batch_norm_eps}


def flux2_geometry(config) -> tuple[int, int, int]:
    """(latent channels, pixels per latent cell, size multiple) of a FLUX.2 VAE config: 32, 8, 16 for Lens's;
    the 2×2 patchify needs an even latent, hence twice the factor."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    factor = 2 ** (len(get("block_out_channels")) - 1)
    return get("latent_channels"), factor, 2 * factor


def describe_codec(spec: str) -> tuple[dict, int]:
    """`load_codec(spec).identity()` and the codec's size multiple, from the VAE's config.json alone (no weights
    read; what the shards' cache key needs)."""
    kind, _, path = spec.partition(":")
    if kind != "flux2":
        codec = load_codec(spec)  # pixel: nothing to load; a wrong spec fails here
        return codec.identity(), codec.multiple
    from diffusers import AutoencoderKLFlux2

    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"FLUX.2 VAE directory not found: {path or '(none given)'} (codec {spec})")
    config = AutoencoderKLFlux2.extract_init_dict(AutoencoderKLFlux2.load_config(path))[0]  # + the defaults
    channels, factor, multiple = flux2_geometry(config)
    return {"codec": spec, "channels": channels, "factor": factor, "batch_norm_eps": config["batch_norm_eps"]}, \
        multiple


CODECS = {"pixel": "lossless pixel-unshuffle (pixel or pixel:F, default F = 4)", "flux2": "flux2:PATH, FLUX.2 VAE"}


def load_codec(spec: str, device=None, dtype: torch.dtype = torch.float32) -> Codec:
    kind, _, arg = spec.partition(":")
    if kind == "pixel":
        try:
            factor = int(arg) if arg else 4
        except ValueError:
            raise ValueError(f"codec {spec!r}: pixel factor must be an integer") from None
        return PixelCodec(factor)
    if kind == "flux2":
        if not arg:
            raise ValueError("codec 'flux2' needs a directory: flux2:PATH")
        return Flux2Codec(arg, device=device, dtype=dtype)
    raise LookupError(f"unknown codec {spec!r}; known: {', '.join(CODECS)}")
