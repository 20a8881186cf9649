"""LoRA training through peft, on the plain MMDiT before it is parallelized.

    model = add_adapters(model, cfg.lora, seed)     # peft LoRA layers on cfg.lora.targets; only they train
    state = adapter_state(model)                    # {X.lora_A.weight (r × in), X.lora_B.weight (out × r)}
    plain = merged_state(model, adapters)           # the plain MMDiT's state, adapters merged (sample grids)

peft names a wrapped Linear's weights `X.base_layer.weight` and its adapter `X.lora_A.default.weight`; files use
PEFT's saved names (`X.lora_A.weight`, inference/lora.py owns them). Initialisation is peft's (A Kaiming-uniform,
B zero: the fine-tune starts exactly at the base), drawn from its own seeded generator so that every rank and
every resume builds the same adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from inference import lora as lora_files
from training.ema import plain_name
from training.train_config import LoraConfig

ADAPTER = "default"  # peft's adapter name inside the model


def base_dtype(cfg: LoraConfig, device: torch.device) -> torch.dtype:
    if cfg.base_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.base_dtype)


def add_adapters(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """Inject LoRA layers (in place) and freeze everything else. Each target must match at least one module."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in cfg.targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        raise ValueError(f"train.lora.targets {unmatched} match no module of the model (e.g. attn.img_qkv, "
                         "img_mlp.w1, attn.to_out.0: the released names)")
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=list(cfg.targets))
    with torch.random.fork_rng(devices=[]):  # the adapters' init leaves the run's RNG streams alone
        torch.manual_seed(seed)
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name and p.dtype != torch.float32:  # over a bf16 base: the trained weights stay fp32
            p.data = p.data.float()
    return model


def file_key(name: str) -> str:
    """peft's parameter name → the file's: 'X.lora_A.default.weight' → 'X.lora_A.weight' (wrappers dropped)."""
    return plain_name(name).replace(f".{ADAPTER}.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """peft's name of a base weight → the plain model's: 'X.base_layer.weight' → 'X.weight'."""
    return plain_name(name).replace(".base_layer.", ".")


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """The frozen base's weights in `dtype` (bf16 halves them on a GPU); adapters stay fp32."""
    for name, p in model.named_parameters():
        if not is_adapter(name) and p.is_floating_point():
            p.data = p.data.to(dtype)


def adapter_state(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{file key: tensor} of the adapter entries of a {peft name: tensor} mapping."""
    return {file_key(n): t for n, t in named.items() if is_adapter(n)}


def to_model_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's adapter state → {peft parameter name: tensor} for `model`; ValueError when they do not match."""
    names = {file_key(n): n for n, _ in model.named_parameters() if is_adapter(n)}
    if set(names) != set(state):
        extra, missing = sorted(set(state) - set(names)), sorted(set(names) - set(state))
        raise ValueError(f"the adapter state does not fit this run's LoRA (targets or model differ): "
                         f"{len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}")
    return {names[k]: v for k, v in state.items()}


def merged_state(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], cfg: LoraConfig) -> dict:
    """The plain MMDiT's state: `base` ({peft name or plain name: tensor}) with `adapters` (file keys) merged."""
    plain = {base_name(n): t.detach().float().clone() for n, t in base.items() if not is_adapter(n)}
    scale = cfg.alpha / cfg.rank
    modules = {k[: -len(".lora_A.weight")] for k in adapters if k.endswith(".lora_A.weight")}
    for module in modules:
        a, b = adapters[f"{module}.lora_A.weight"], adapters[f"{module}.lora_B.weight"]
        plain[f"{module}.weight"] += lora_files.delta(a, b, scale).to(plain[f"{module}.weight"].device)
    return plain
