"""Checkpoints: safetensors only, loaded strictly, with the config travelling with the weights.

A step directory (ARCHITECTURE.md, "Run directory") holds `model.safetensors` and `ema.safetensors`; each file
carries the `CheckpointSpec` (model config, codec, text encoder) as JSON in its safetensors metadata, and
`model_config.json` beside them says the same for people and tools.

    weights, spec = resolve_checkpoint(run="runs/demo")          # latest step, EMA preferred
    model = load_model(weights, spec, device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inference.config import ModelConfig
from inference.mmdit import MMDiT

SPEC_KEY = "lensforge.spec"
SPEC_FILE = "model_config.json"
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")  # in order of preference
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointSpec(BaseModel):
    """What it takes to sample from a set of weights besides the weights."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig
    codec: str = "pixel"  # `inference.codecs.load_codec` spec
    text_encoder: str = "minilm"  # `inference.text.load_text_encoder` spec


def save_weights(path: str | Path, state: dict[str, torch.Tensor], spec: CheckpointSpec) -> Path:
    """Write one safetensors file with the spec in its metadata, through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={SPEC_KEY: spec.model_dump_json()})
    os.replace(tmp, path)
    return path


def save_checkpoint(step_dir: str | Path, model: MMDiT, spec: CheckpointSpec, ema: dict | None = None) -> Path:
    """`model.safetensors` (+ `ema.safetensors` when given) and `model_config.json` in `step_dir`."""
    step_dir = Path(step_dir)
    save_weights(step_dir / "model.safetensors", model.state_dict(), spec)
    if ema is not None:
        save_weights(step_dir / "ema.safetensors", ema, spec)
    (step_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")
    return step_dir


def save_random_checkpoint(step_dir, spec: CheckpointSpec, seed: int = 0, std: float = 0.02) -> Path:
    """A randomly initialised checkpoint in the same layout as training's, for tests and demos. Every weight is
    perturbed by N(0, std²) so that the adaLN-zero blocks are not the identity and samples are not flat."""
    torch.manual_seed(seed)
    model = MMDiT(spec.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return save_checkpoint(step_dir, model, spec, ema=model.state_dict())


def latest_step_dir(run: str | Path) -> Path:
    ckpts = Path(run) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in ckpts.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    if not steps:
        raise FileNotFoundError(f"no checkpoints/step_* directory in run {run}")
    return max(steps)[1]


def resolve_checkpoint(run=None, checkpoint=None, prefer_ema: bool = True) -> tuple[Path, CheckpointSpec]:
    """The weights file to load and its spec: `run` → its latest step; `checkpoint` → a step dir or a file."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of a run directory or a checkpoint")
    where = latest_step_dir(run) if run is not None else Path(checkpoint)
    if where.is_file():
        weights = where
    elif where.is_dir():
        names = WEIGHT_FILES if prefer_ema else WEIGHT_FILES[::-1]
        found = [where / n for n in names if (where / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {where}")
        weights = found[0]
    else:
        raise FileNotFoundError(f"checkpoint not found: {where}")
    return weights, read_spec(weights)


def read_spec(weights: str | Path) -> CheckpointSpec:
    """The spec from the file's metadata, else from `model_config.json` beside it."""
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: only .safetensors checkpoints are loaded")
    with safe_open(str(weights), framework="pt") as f:
        raw = (f.metadata() or {}).get(SPEC_KEY)
    if raw is None and (weights.parent / SPEC_FILE).is_file():
        raw = (weights.parent / SPEC_FILE).read_text()
    if raw is None:
        raise ValueError(f"{weights}: no model config in its metadata and no {SPEC_FILE} beside it")
    try:
        return CheckpointSpec.model_validate_json(raw)
    except ValueError as err:
        raise ValueError(f"{weights}: unreadable model config: {str(err).splitlines()[0]}") from None


def state_diff(model_shapes: dict, file_shapes: dict, limit: int = 5) -> str | None:
    """One line naming missing, unexpected and mis-shaped keys (the first `limit` of each), or None if equal."""
    missing = sorted(set(model_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(model_shapes))
    shapes = sorted(
        f"{k} {tuple(file_shapes[k])}≠{tuple(model_shapes[k])}"
        for k in set(model_shapes) & set(file_shapes)
        if tuple(model_shapes[k]) != tuple(file_shapes[k])
    )
    parts = []
    for label, keys in ("missing", missing), ("unexpected", unexpected), ("wrong shape (file≠model)", shapes):
        if keys:
            more = f", … {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts) or None


def load_model(weights: str | Path, spec: CheckpointSpec, device=None, dtype=torch.float32) -> MMDiT:
    """Build the model the spec names and load the weights strictly (a readable ValueError otherwise)."""
    with torch.device("meta"):
        model = MMDiT(spec.model)
    with safe_open(str(weights), framework="pt") as f:
        file_shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    diff = state_diff({k: v.shape for k, v in model.state_dict().items()}, file_shapes)
    if diff:
        raise ValueError(f"{weights} does not fit model {spec.model.name!r}: {diff}")
    state = load_file(str(weights), device=str(device or "cpu"))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def file_fingerprint(path: str | Path, chunk: int = 16 * 2**20) -> str:
    """sha256 of a file's size, first and last 16 MiB (whole file when smaller): cheap even for 40 GB of
    weights, and any retrained or converted file changes it. Directories: over their files, sorted."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(chunk))
            if size > 2 * chunk:
                f.seek(size - chunk)
                digest.update(f.read(chunk))
            elif size > chunk:
                digest.update(f.read())
    return digest.hexdigest()
