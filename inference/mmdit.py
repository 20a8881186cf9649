"""The Lens denoiser: a dual-stream MMDiT (joint attention over [image; text]) as a plain `nn.Module`.

    model = MMDiT(get_preset("tiny"))
    v = model(latents, t, text, text_mask)   # (B, C, H, W), (B,), (B, L, K·Dt), (B, L) → (B, C, H, W)

The released `LensTransformer2DModel`, module for module and name for name (`transformer_blocks.N.attn.img_qkv`,
…), so a state dict moves between lensforge, diffusers and ComfyUI without a key map. Each block keeps two residual
streams, image and text, with their own adaLN modulation, RMSNorms, fused QKV and output projections (with bias),
per-head QK-RMSNorm and gated MLP, and one joint attention. adaLN reads only the timestep. Guidance, parallelism
and compile are applied from outside.

One deliberate difference from the diffusers port (PR #13837): padded text tokens are masked out as keys in EVERY
block. The port pops the mask from keyword arguments shared by all blocks, so only its first block masks; set
`model.masked_blocks = 1` to reproduce that (for comparisons only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig
from inference.layers import (
    BLOCK_EPS,
    TEXT_EPS,
    AdaLayerNormOut,
    GateMLP,
    RMSNorm,
    TimeEmbed,
    apply_rope,
    modulate,
    rope_freqs,
    rope_positions,
)


class JointAttention(nn.Module):
    """A block's `attn`: per-stream fused QKV (bias), per-head QK-RMSNorm, RoPE, one SDPA, per-stream output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, self.heads, self.head_dim = cfg.hidden, cfg.heads, cfg.head_dim
        self.norm_q, self.norm_k = RMSNorm(cfg.head_dim, BLOCK_EPS), RMSNorm(cfg.head_dim, BLOCK_EPS)
        self.norm_added_q, self.norm_added_k = RMSNorm(cfg.head_dim, BLOCK_EPS), RMSNorm(cfg.head_dim, BLOCK_EPS)
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # the release's `to_out.0` (its `.1` is an Identity)
        self.to_add_out = nn.Linear(dim, dim)

    def _qkv(self, linear: nn.Linear, x: torch.Tensor):
        """(B, T, D) → q, k, v (B, T, H, Dh)."""
        return linear(x).view(*x.shape[:2], 3, self.heads, self.head_dim).unbind(dim=2)

    def forward(self, img, txt, freqs, mask, text_out: bool = True):
        """img (B, N, D), txt (B, L, D), freqs (N+L, Dh/2) complex, mask (B, 1, 1, N+L) bool or None.
        → image output (B, N, D) and text output (B, L, D), or None when text_out is False (the last block:
        nothing reads its text stream, so its text queries are not computed)."""
        n = img.shape[1]
        img_q, img_k, img_v = self._qkv(self.img_qkv, img)
        txt_q, txt_k, txt_v = self._qkv(self.txt_qkv, txt)
        img_q = apply_rope(self.norm_q(img_q), freqs[:n])
        img_k = apply_rope(self.norm_k(img_k), freqs[:n])
        txt_k = apply_rope(self.norm_added_k(txt_k), freqs[n:])
        if text_out:
            q = torch.cat([img_q, apply_rope(self.norm_added_q(txt_q), freqs[n:])], dim=1)
        else:
            q = img_q
        k, v = torch.cat([img_k, txt_k], dim=1), torch.cat([img_v, txt_v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)  # (B, H, Tq, Dh)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, Tq, D)
        img_out = self.to_out[0](out[:, :n].contiguous())
        return img_out, self.to_add_out(out[:, n:].contiguous()) if text_out else None


class JointBlock(nn.Module):
    """One of `transformer_blocks`: adaLN (shift, scale, gate × attention, MLP) per stream, then joint attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.hidden
        self.attn = JointAttention(cfg)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2 = RMSNorm(dim, BLOCK_EPS), RMSNorm(dim, BLOCK_EPS)
        self.img_mlp = GateMLP(dim, cfg.mlp)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1, self.txt_norm2 = RMSNorm(dim, BLOCK_EPS), RMSNorm(dim, BLOCK_EPS)
        self.txt_mlp = GateMLP(dim, cfg.mlp)

    def forward(self, img, txt, temb, freqs, mask, text_out: bool = True):
        """img (B, N, D), txt (B, L, D), temb (B, D) → (img, txt). text_out=False (the last block) skips the text
        stream after attention, whose result nothing reads, and returns txt unchanged."""
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)  # (B, 3D) each
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate1 = modulate(self.img_norm1(img), img_mod1)
        txt_in, txt_gate1 = modulate(self.txt_norm1(txt), txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, freqs, mask, text_out)
        img = img + img_gate1 * img_attn
        img_in, img_gate2 = modulate(self.img_norm2(img), img_mod2)
        img = img + img_gate2 * self.img_mlp(img_in)
        if text_out:
            txt = txt + txt_gate1 * txt_attn
            txt_in, txt_gate2 = modulate(self.txt_norm2(txt), txt_mod2)
            txt = txt + txt_gate2 * self.txt_mlp(txt_in)
        if img.dtype == torch.float16:  # as the release: keep fp16 residual streams finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p·W/p, C·p·p), channel-major inside a token as FLUX.2's `_patchify_latents`."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h·w, C·p·p) → (B, C, h·p, w·p); the exact inverse of `patchify` (the Lens pipeline's unpacking)."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (p * p)
    return tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


def joint_mask(text_mask: torch.Tensor | None, n_image: int) -> torch.Tensor | None:
    """Key mask (B, 1, 1, N+L) for SDPA, True = attend; None when no text token is padding (SDPA's fast path).

    `text_mask.all()` is a host-device sync, once per forward.
    """
    if text_mask is None or (not text_mask.is_meta and bool(text_mask.all())):
        return None
    keep_image = text_mask.new_ones(text_mask.shape[0], n_image)
    return torch.cat([keep_image, text_mask.bool()], dim=1)[:, None, None, :]


class MMDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden
        self.masked_blocks: int | None = None  # None: mask padded text in every block; 1: the diffusers port's way
        self.img_in = nn.Linear(cfg.token_channels, dim)
        self.time_text_embed = TimeEmbed(dim)
        self.txt_norm = nn.ModuleList(RMSNorm(cfg.text_dim, TEXT_EPS) for _ in range(cfg.text_layers))
        self.txt_in = nn.Linear(cfg.text_layers * cfg.text_dim, dim)
        self.transformer_blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = AdaLayerNormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.token_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's init, adaLN-zero: every modulation and the final projection start at zero, so each block is the
        identity and the model outputs zero. On the meta device there is nothing to set (a model built there for
        loading gets its values from the file): call it after `to_empty`."""
        if next(self.parameters()).is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        embedder = self.time_text_embed.timestep_embedder
        for linear in embedder.linear_1, embedder.linear_2:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.transformer_blocks:
            for mod in block.img_mod[1], block.txt_mod[1]:
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for linear in self.norm_out.linear, self.proj_out:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L, K·Dt) multi-layer features → per-layer RMSNorm, concat, projection → (B, L, D)."""
        cfg = self.config
        if text.shape[-1] != cfg.text_layers * cfg.text_dim:
            raise ValueError(
                f"text features have width {text.shape[-1]}; model {cfg.name!r} expects "
                f"{cfg.text_layers} layers × {cfg.text_dim} = {cfg.text_layers * cfg.text_dim}"
            )
        layers = text.split(cfg.text_dim, dim=-1)  # K × (B, L, Dt)
        return self.txt_in(torch.cat([norm(x) for norm, x in zip(self.txt_norm, layers)], dim=-1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) in [0, 1] (1 = noise), text (B, L, K·Dt), text_mask (B, L) bool."""
        cfg, p = self.config, self.config.patch
        b, c, hh, ww = x.shape
        if c != cfg.in_channels or hh % p or ww % p:
            raise ValueError(f"latents {tuple(x.shape)}: model wants {cfg.in_channels} channels, sides ÷ {p}")
        h, w = hh // p, ww // p
        img = self.img_in(patchify(x, p))  # (B, N, D)
        txt = self.embed_text(text)  # (B, L, D)
        temb = self.time_text_embed(t, img)  # (B, D)
        freqs = rope_freqs(rope_positions(h, w, txt.shape[1], device=x.device), cfg.rope_axes)  # (N+L, Dh/2)
        mask = joint_mask(text_mask, h * w)
        # The last block's text output feeds nothing: its text q-norm, output projection and MLP get no gradient
        # (SD3's `context_pre_only` drops them; the release keeps them, and so do we). DDP therefore needs
        # find_unused_parameters (or static_graph).
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            block_mask = mask if self.masked_blocks is None or i < self.masked_blocks else None
            img, txt = block(img, txt, temb, freqs, block_mask, text_out=i < last)
        out = self.proj_out(self.norm_out(img, temb))  # (B, N, C·p²)
        return unpatchify(out, h, w, p)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())
