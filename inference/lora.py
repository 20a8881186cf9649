"""LoRA adapters as files: the one owner of their on-disk format, reading the common key styles, merging.

    adapter = read_adapter("runs/lora/checkpoints/step_00002000/adapter_ema.safetensors")
    merge_adapters(model, [(adapter, 1.0)])             # W ← W + weight · (α / r) · B·A, per adapted Linear
    state = export_state(adapter, prefix="transformer.")  # diffusers' / ComfyUI's keys, the scale baked into B

lensforge's own files (`ADAPTER_FILES` in a LoRA run's step directory) hold PEFT's keys without the adapter name,
`transformer_blocks.0.attn.img_qkv.lora_A.weight` (r × in) and `…lora_B.weight` (out × r), in fp32, with two JSON
metadata entries: the base's `CheckpointSpec` (`lensforge.spec`) and `LoraInfo` (`lensforge.lora`: r, α, targets,
the base's path and fingerprint). `read_adapter` also takes the keys under `transformer.` (diffusers),
`diffusion_model.` (ComfyUI), `base_model.model.` (a PEFT save), with a scale from `X.alpha` keys (kohya /
ComfyUI), diffusers' `lora_adapter_metadata`, ours, or 1 (α = r, what those loaders assume without one).

The merge is three lines of arithmetic rather than peft's `merge_and_unload`, so that inference needs no peft
and a merged model is a plain MMDiT; tests/training/test_lora.py checks it against peft's own forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from inference.weights_io import read_header, read_tensors

ADAPTER_FILES = ("adapter_ema.safetensors", "adapter.safetensors")  # in a LoRA run's step dir, by preference
LORA_KEY = "lensforge.lora"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(DIR) looks for
KEY_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")


class LoraInfo(BaseModel):
    """What a lensforge adapter file says about itself."""

    model_config = ConfigDict(extra="forbid")

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: list[str]
    base: str | None = None  # the path the run's init_from named
    base_fingerprint: str | None = None  # `inference.checkpoint.source_fingerprint` of the base's files


@dataclass
class Adapter:
    """{module name: (A (r, in), B (out, r), scale)} of one adapter file; `info` for lensforge's own."""

    path: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    info: LoraInfo | None
    spec_json: str | None  # the base's CheckpointSpec, in lensforge's own files

    @property
    def parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.modules.values())


def is_adapter_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    entries, _ = read_header(path)
    return bool(entries) and all(".lora_" in k or k.endswith(".alpha") for k in entries)


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], info: LoraInfo, spec_json: str) -> Path:
    """`state`: PEFT's keys without the adapter name (`X.lora_A.weight`, `X.lora_B.weight`)."""
    from inference.checkpoint import SPEC_KEY, write_safetensors

    return write_safetensors(path, state, {SPEC_KEY: spec_json, LORA_KEY: info.model_dump_json()})


def _module_and_part(key: str) -> tuple[str, str]:
    """'transformer.X.lora_A.default.weight' → ('X', 'A'); 'X.alpha' → ('X', 'alpha')."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for part in ("A", "B"):
        for tail in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if key.endswith(tail):
                return key[: -len(tail)], part
    raise ValueError(f"{key}: not a LoRA key (expected …lora_A.weight, …lora_B.weight or …alpha)")


def read_adapter(path: str | Path) -> Adapter:
    """One adapter file, in any of the key styles the module docstring lists; ValueError naming what is wrong."""
    from inference.checkpoint import SPEC_KEY

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    _, meta = read_header(path)
    info = LoraInfo.model_validate_json(meta[LORA_KEY]) if LORA_KEY in meta else None
    default_alpha = info.alpha if info else None
    if default_alpha is None and DIFFUSERS_METADATA_KEY in meta:
        config = json.loads(meta[DIFFUSERS_METADATA_KEY])
        default_alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path):
        module, part = _module_and_part(key)
        parts.setdefault(module, {})[part] = tensor
    if not parts:
        raise ValueError(f"{path}: no LoRA weights in it")
    modules = {}
    for module, found in sorted(parts.items()):
        if "A" not in found or "B" not in found:
            raise ValueError(f"{path}: {module} has {sorted(found)} but a LoRA needs both lora_A and lora_B")
        a, b = found["A"], found["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             "make a rank-r pair (r × in, out × r)")
        rank = a.shape[0]
        alpha = float(found["alpha"]) if "alpha" in found else default_alpha
        modules[module] = (a, b, (alpha / rank) if alpha is not None else 1.0)
    return Adapter(path, modules, info, meta.get(SPEC_KEY))


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'FILE[:SCALE]' → (FILE, SCALE); a path that itself holds ':' works when no float follows the last one."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B·A in fp32, (out, in)."""
    return (b.float() @ a.float()) * scale


@torch.no_grad()
def merge_adapters(model: torch.nn.Module, adapters: list[tuple[Adapter, float]]) -> torch.nn.Module:
    """Add each adapter's update, times its weight, into the plain model's Linear weights (in place)."""
    params = dict(model.named_parameters())
    for adapter, weight in adapters:
        for module, (a, b, scale) in adapter.modules.items():
            target = params.get(f"{module}.weight")
            if target is None:
                raise ValueError(f"{adapter.path}: adapts {module}, which this model does not have "
                                 f"(is it a LoRA of another model?)")
            if tuple(target.shape) != (b.shape[0], a.shape[1]):
                raise ValueError(f"{adapter.path}: {module} is {tuple(target.shape)} in the model, the adapter "
                                 f"makes {(b.shape[0], a.shape[1])}: a LoRA of another model size")
            update = delta(a, b, scale * weight).to(target.device)
            target.copy_((target.float() + update).to(target.dtype))
    return model


def export_state(adapter: Adapter, prefix: str = "transformer.", dtype: torch.dtype | None = None) -> dict:
    """diffusers' / ComfyUI's keys (`PREFIX X.lora_A.weight`, `…lora_B.weight`) with the scale baked into B, so
    that loaders assuming α = r (diffusers without metadata, ComfyUI without `.alpha`) apply it exactly."""
    out = {}
    for module, (a, b, scale) in adapter.modules.items():
        a, b = a.float(), b.float() * scale
        out[f"{prefix}{module}.lora_A.weight"] = a.to(dtype) if dtype else a
        out[f"{prefix}{module}.lora_B.weight"] = b.to(dtype) if dtype else b
    return out
