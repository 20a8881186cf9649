"""Lens-Turbo's discriminator: a small head on one block's image tokens of the frozen teacher.

    tap = FeatureTap(teacher, block=depth // 2)     # a forward hook: the block's image stream, (B, N, D)
    teacher(x_t, t, text, mask); features = tap.take()
    logits = head(features)                          # (B, 1)

The teacher stays frozen (its weights get no gradient), so the discriminator is cheap to train and cannot drift
far from what the teacher sees; the student's GAN gradient still flows through the teacher into its samples.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureTap:
    """Keeps the image tokens one of `model.transformer_blocks` outputs on its latest forward."""

    def __init__(self, model: nn.Module, block: int):
        blocks = model.transformer_blocks
        if not 0 <= block < len(blocks):
            raise ValueError(f"distill.disc.block {block}: the teacher has blocks 0–{len(blocks) - 1}")
        self.value: torch.Tensor | None = None
        self.handle = blocks[block].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output[0]  # a JointBlock returns (img, txt)

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the teacher ran no forward since the features were last taken")
        return value


class DiscHead(nn.Module):
    """(B, N, D) tokens → (B, 1) logits: a per-token MLP on normalised features, averaged over tokens (any
    resolution, any bucket)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens.float())).mean(dim=1)
