"""Parallelism applied from outside the plain `MMDiT` (torchtitan's `parallelize.py`): per-block activation
checkpointing, then per-block `torch.compile`, then DDP or FSDP2 (`fully_shard` per block, then the root).

    dist = init_distributed("auto")                  # torchrun's env → process group; plain `python` → world 1
    model = parallelize(MMDiT(cfg), parallel_cfg, dist, bf16=True)
    with autocast(dist.device, bf16=True, fsdp=...): loss = ...

The last block's text-stream weights get no gradient (inference/mmdit.py): DDP runs with `static_graph=True`
(the graph is the same every step), FSDP2 leaves their gradients None on every rank alike.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.train_config import ParallelConfig


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(choice)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_choice: str = "auto") -> Dist:
    """A process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, device)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block recomputed in the backward: activations of one block at a time instead of all of them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.transformer_blocks):
        # no randomness inside a block
        model.transformer_blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` per block (in place: parameter names do not change). Blocks repeat, so one compiled
    graph per distinct token shape serves all of them."""
    for block in model.transformer_blocks:
        block.compile()


def apply_fsdp(model: nn.Module, d: Dist, bf16: bool, reshard_after_forward: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the all-gather hook);
    # the trainer never modifies model outputs in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(d.device.type, (d.world,))
    # bf16: gather and compute in bf16, reduce gradients in fp32 (torchtitan's default); fp32 master weights.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, cfg: ParallelConfig, d: Dist, bf16: bool) -> nn.Module:
    """AC → compile → DDP or FSDP2 (only with a process group of more than one rank; otherwise the model)."""
    if not next(model.parameters()).is_meta:  # a meta model is materialised after sharding (model_init.py)
        model.to(d.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if not d.enabled or d.world == 1:
        return model
    if cfg.strategy == "fsdp":
        return apply_fsdp(model, d, bf16, cfg.reshard_after_forward)
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The MMDiT inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def autocast(device: torch.device, bf16: bool, fsdp: bool):
    """bf16 autocast, except under FSDP2, whose mixed-precision policy already computes in bf16."""
    if not bf16 or fsdp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def all_reduce(values: list[float], d: Dist, device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) of a few floats over ranks, as Python floats; one small collective and host sync."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
