"""Exponential moving average of the weights, kept on the model's device or on the CPU, sharded like the model.

    ema = EMA(model, decay=0.9999, device="cpu")   # after parallelize: FSDP parameters are DTensors
    ema.update(step)                                # after each optimizer step: e ← decay·e + (1 − decay)·p
    full = ema.full_state(model)                    # {name: tensor} of the whole model (a collective under FSDP)

Names are the plain model's (`transformer_blocks.0.attn.img_qkv.weight`), whatever wrappers (DDP's `module.`,
activation checkpointing's `_checkpoint_wrapped_module.`) sit in between. Only trainable weights are averaged (a
LoRA run's adapters, not its frozen base). Under FSDP each rank averages its own shard only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

WRAPPERS = {"module", "_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model (wrapper components dropped)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def gather_full(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> dict:
    """{name: full tensor on the CPU} of `params` (or of `values`, local shards laid out like them). Under FSDP
    every rank must call it (one all-gather per DTensor)."""
    out = {}
    for name, p in params.items():
        value = p.detach() if values is None else values[name]
        if isinstance(p, DTensor):
            shard = value if values is None else DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                                    run_check=False, shape=p.shape, stride=p.stride())
            out[name] = shard.full_tensor().cpu()
        else:
            out[name] = value.detach().cpu()
    return out


class EMA:
    def __init__(self, model: nn.Module, decay: float, device: str = "same", every: int = 1):
        self.decay, self.every = decay, every
        self.params = {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.device = None if device == "same" else torch.device(device)
        with torch.no_grad():
            self.shadow = {n: local(p).detach().float().to(self.device or local(p).device, copy=True)
                           for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend in the current weights every `every` steps, with the decay compounded over them."""
        if step % self.every:
            return
        weight = 1.0 - self.decay**self.every
        names = list(self.shadow)
        current = [local(self.params[n]).detach() for n in names]
        if self.device is not None:
            current = [c.to(self.device, non_blocking=True) for c in current]
        torch._foreach_lerp_([self.shadow[n] for n in names], [c.float() for c in current], weight)

    def full_state(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 tensor on the CPU}. Under FSDP all ranks must call it (all-gathers)."""
        return gather_full(self.params, self.shadow)

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of a full EMA state (as `full_state` returns and ema.safetensors holds)."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} weights, e.g. {missing[:3]}")
        for name, shadow in self.shadow.items():
            p, full = self.params[name], state[name].float()
            if isinstance(p, DTensor):
                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            shadow.copy_(full.to(shadow.device))
