"""The Lens denoiser: a dual-stream MMDiT (SD3-style joint attention) as a plain `nn.Module`.

    model = MMDiT(get_preset("tiny"))
    v = model(latents, t, text, text_mask)   # (B, C, H, W), (B,), (B, L, K·Dt), (B, L) → (B, C, H, W)

Each block keeps two residual streams, image and text, with their own adaLN modulation, QKV and output
projections, QK-RMSNorm and SwiGLU MLP, and one joint attention over [image; text] in which padded text tokens are
masked out as keys. adaLN reads only the timestep. Guidance, parallelism and compile are applied from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig
from inference.layers import (
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    modulate,
    rms_norm,
    rope_freqs,
    rope_positions,
)


class Stream(nn.Module):
    """One stream's weights in a block: adaLN (shift/scale/gate for attention and MLP), QKV, output, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.hidden
        self.heads, self.head_dim, self.eps = cfg.heads, cfg.head_dim, cfg.eps
        self.mod = nn.Linear(dim, 6 * dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim, cfg.mlp)

    def attention_inputs(self, x: torch.Tensor, c: torch.Tensor, queries: bool = True):
        """x (B, T, D), c (B, D) → q, k, v (B, T, H, Dh) and the six modulations, each (B, 1, D)."""
        mods = self.mod(c)[:, None].chunk(6, dim=-1)
        h = modulate(rms_norm(x, self.eps), mods[0], mods[1])
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        return self.q_norm(q) if queries else None, self.k_norm(k), v, mods

    def residual(self, x: torch.Tensor, attn: torch.Tensor, mods) -> torch.Tensor:
        """Gated attention output, then the gated MLP; attn (B, T, D)."""
        x = x + mods[2] * self.proj(attn)
        return x + mods[5] * self.mlp(modulate(rms_norm(x, self.eps), mods[3], mods[4]))


class JointBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.img = Stream(cfg)
        self.txt = Stream(cfg)

    def forward(self, img, txt, c, freqs, mask, text_out: bool = True):
        """img (B, N, D), txt (B, L, D), c (B, D), freqs (N+L, Dh/2) complex, mask (B, 1, 1, N+L) bool or None.

        text_out=False (the last block) skips the text queries and the text stream after attention, whose
        result nothing reads."""
        n = img.shape[1]
        qi, ki, vi, img_mods = self.img.attention_inputs(img, c)
        qt, kt, vt, txt_mods = self.txt.attention_inputs(txt, c, queries=text_out)
        if text_out:
            q = apply_rope(torch.cat([qi, qt], dim=1), freqs).transpose(1, 2)  # (B, H, N+L, Dh)
        else:  # only image queries are read
            q = apply_rope(qi, freqs[:n]).transpose(1, 2)  # (B, H, N, Dh)
        k = apply_rope(torch.cat([ki, kt], dim=1), freqs).transpose(1, 2)
        v = torch.cat([vi, vt], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)  # (B, N+L, D)
        img = self.img.residual(img, out[:, :n], img_mods)
        return img, self.txt.residual(txt, out[:, n:], txt_mods) if text_out else txt


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p·W/p, C·p·p), channel-major inside a token as FLUX.2's `_patchify_latents`."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h·w, C·p·p) → (B, C, h·p, w·p); the exact inverse of `patchify`."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (p * p)
    return tokens.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


def joint_mask(text_mask: torch.Tensor | None, n_image: int) -> torch.Tensor | None:
    """Key mask (B, 1, 1, N+L) for SDPA, True = attend; None when no text token is padding (SDPA's fast path).

    `text_mask.all()` is a host-device sync, once per forward.
    """
    if text_mask is None or (not text_mask.is_meta and bool(text_mask.all())):
        return None
    keep_image = text_mask.new_ones(text_mask.shape[0], n_image)
    return torch.cat([keep_image, text_mask], dim=1)[:, None, None, :]


class MMDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden
        self.x_embed = nn.Linear(cfg.token_channels, dim)
        self.t_embed = TimestepEmbedder(dim, cfg.timestep_dim)
        self.text_norm = RMSNorm((cfg.text_layers, cfg.text_dim), cfg.eps)  # one RMSNorm per text layer
        self.text_embed = nn.Linear(cfg.text_layers * cfg.text_dim, dim)
        self.blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.depth))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final = nn.Linear(dim, cfg.token_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's init, adaLN-zero: every modulation and the final projection start at zero, so each block is the
        identity and the model outputs zero. Call again after `to_empty` when built on the meta device."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for linear in self.t_embed.mlp[0], self.t_embed.mlp[2]:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            for stream in block.img, block.txt:
                nn.init.zeros_(stream.mod.weight)
                nn.init.zeros_(stream.mod.bias)
        for linear in self.final_mod, self.final:
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
        normed = self.text_norm(text.unflatten(-1, (cfg.text_layers, cfg.text_dim)))  # (B, L, K, Dt)
        return self.text_embed(normed.flatten(-2))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) in [0, 1] (1 = noise), text (B, L, K·Dt), text_mask (B, L) bool."""
        cfg, p = self.config, self.config.patch
        b, c, hh, ww = x.shape
        if c != cfg.in_channels or hh % p or ww % p:
            raise ValueError(f"latents {tuple(x.shape)}: model wants {cfg.in_channels} channels, sides ÷ {p}")
        h, w = hh // p, ww // p
        img = self.x_embed(patchify(x, p))  # (B, N, D)
        txt = self.embed_text(text)  # (B, L, D)
        cond = F.silu(self.t_embed(t))  # (B, D); the SiLU of every adaLN, applied once
        pos = rope_positions(h, w, txt.shape[1], device=x.device)
        freqs = rope_freqs(pos, cfg.rope_axes, cfg.rope_theta)  # (N+L, Dh/2) complex
        mask = joint_mask(text_mask, h * w)
        # The last block's text output feeds nothing: its text proj/MLP/q_norm stay unused (no gradient, as SD3's
        # `context_pre_only` drops them). They are kept: Lens's ≈ 4.10 B count includes them. DDP therefore
        # needs find_unused_parameters (or static_graph).
        for i, block in enumerate(self.blocks):
            img, txt = block(img, txt, cond, freqs, mask, text_out=i < len(self.blocks) - 1)
        shift, scale = self.final_mod(cond)[:, None].chunk(2, dim=-1)
        out = self.final(modulate(rms_norm(img, cfg.eps), shift, scale))  # (B, N, C·p²)
        return unpatchify(out, h, w, p)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())
