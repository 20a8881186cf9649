"""How a run's model comes to be: fresh, from `init_from`, or from its own checkpoint; whole or FSDP-sharded.

    model = build_model(cfg, model_cfg, weights, adapters, d, bf16)   # parallelized (training/parallel.py)

`weights`: the base's `DenoiserSource` (init_from, or the run's own model.safetensors on resume), None for a fresh
model (seeded, the same on every rank). `adapters`: the LoRA state to resume ({file key: tensor}), None for fresh
adapters.

Whole (one process, or DDP): the weights are read into the model on the CPU, then moved. Sharded (FSDP2 with more
than one rank) and starting from weights: the model is built on the meta device, sharded, `to_empty` on the device,
and each rank reads only its own rows of each tensor from the files (FSDP2 shards dim 0 like `torch.chunk`), so
no rank ever holds a full copy; a 3.8 B release costs each of 8 ranks 1/8 of its fp32 size.

Fresh LoRA adapters: A uniform(±1/√in) (peft's Kaiming-uniform with a = √5), B = 0, each A drawn from a generator
seeded by (seed, its name): the same values whole or sharded, on every rank and every resume.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from inference.checkpoint import DenoiserSource, load_source
from inference.config import ModelConfig
from inference.mmdit import MMDiT
from inference.weights_io import read_header, read_rows
from training import lora
from training.ema import plain_name
from training.loader import seed_of
from training.parallel import Dist, parallelize
from training.train_config import TrainConfig


def fresh_adapter(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """peft's initial value for one adapter weight (see the module docstring), fp32 on the CPU."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])
    generator = torch.Generator().manual_seed(seed_of(seed, "lora", lora.file_key(name)))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, weights: DenoiserSource | None,
                adapters: dict[str, torch.Tensor] | None, d: Dist, bf16: bool) -> nn.Module:
    sharded = cfg.parallel.strategy == "fsdp" and d.enabled and d.world > 1
    if sharded and weights is not None:  # a LoRA always has weights: TrainConfig refuses lora without init_from
        return _build_sharded(cfg, model_cfg, weights, adapters, d, bf16)
    if weights is not None:  # a LoRA's frozen base straight in its dtype (bf16 on a GPU: no fp32 copy on the way)
        dtype = lora.base_dtype(cfg.lora, d.device) if cfg.lora is not None else torch.float32
        model = load_source(weights, dtype=dtype).train()
    else:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = MMDiT(model_cfg)
    if cfg.lora is not None:
        model = lora.add_adapters(model, cfg.lora, cfg.seed)
        values = lora.to_model_names(model, adapters) if adapters is not None else None
        with torch.no_grad():
            for name, p in model.named_parameters():
                if lora.is_adapter(name):
                    p.copy_(values[name] if values else fresh_adapter(name, tuple(p.shape), cfg.seed))
        lora.cast_base(model, lora.base_dtype(cfg.lora, d.device))
    return parallelize(model, cfg.parallel, d, bf16)


def shard_rows(n: int, d: Dist) -> tuple[int, int]:
    """The dim-0 rows [start, stop) FSDP2 gives this rank of a tensor with n rows (torch.chunk's split)."""
    chunk = math.ceil(n / d.world)
    start = min(n, d.rank * chunk)
    return start, min(n, start + chunk)


def _build_sharded(cfg: TrainConfig, model_cfg: ModelConfig, weights: DenoiserSource,
                   adapters: dict[str, torch.Tensor] | None, d: Dist, bf16: bool) -> nn.Module:
    if weights.adapters:
        raise ValueError(f"{weights.files[0]}: a LoRA source cannot be loaded sharded; merge it first "
                         "(lensforge export --merge-lora) and start from the merged weights")
    with torch.device("meta"):
        model = MMDiT(model_cfg)
    if cfg.lora is not None:
        model = lora.add_adapters(model, cfg.lora, cfg.seed)
    model = parallelize(model, cfg.parallel, d, bf16)
    model.to_empty(device=d.device)
    where = {k[len(weights.prefix):]: file for file in weights.files for k in read_header(file)[0]}
    wanted: dict[Path, dict[str, tuple[int, int]]] = defaultdict(dict)
    targets: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p.data
            start, stop = shard_rows(p.shape[0], d) if isinstance(p, DTensor) else (0, p.shape[0])
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: FSDP gave this rank {local.shape[0]} rows, expected {stop - start}")
            if lora.is_adapter(name):
                full = adapters[lora.file_key(name)] if adapters is not None else \
                    fresh_adapter(name, tuple(p.shape), cfg.seed)
                local.copy_(full[start:stop])
                continue
            key = lora.base_name(name) if cfg.lora is not None else plain_name(name)
            if key not in where:
                raise ValueError(f"{weights.files[0]}: no tensor {weights.prefix}{key} for the model's {name}")
            wanted[where[key]][weights.prefix + key] = (start, stop)
            targets[weights.prefix + key] = local
        for file, rows in wanted.items():
            for key, tensor in read_rows(file, rows, dtype=torch.float32):
                targets[key].copy_(tensor)
    return model
