"""Checkpoints: safetensors only, loaded strictly, with the config travelling with the weights.

A step directory (ARCHITECTURE.md, "Run directory") holds `model.safetensors` and `ema.safetensors`; each file
carries the `CheckpointSpec` (model config, codec, text encoder) as JSON in its safetensors metadata, and
`model_config.json` beside them says the same for people and tools.

    weights, spec = resolve_checkpoint(run="runs/demo")          # latest step, EMA preferred
    model = load_model(weights, spec, device="cuda", dtype=torch.bfloat16)
    model = load_denoiser("/models/Lens")                          # or its transformer/, a single file, a run

The weights' names are the released Lens names (inference/mmdit.py), so a lensforge file IS a single-file Lens DiT
with the spec in its metadata; `inference/lens_format.py` owns the released layout that `load_denoiser` also reads
and `lensforge export` writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from common.atomic import atomic_path
from inference import lens_format, lora
from inference.config import ModelConfig
from inference.mmdit import MMDiT
from inference.text import GPT_OSS_LAYERS
from inference.weights_io import read_header, read_tensors

SPEC_KEY = "lensforge.spec"
SPEC_FILE = "model_config.json"
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")  # in order of preference
STEP_DIR = re.compile(r"^step_(\d{8})$")  # RUN/checkpoints/step_XXXXXXXX: the one owner of the name
LEGACY_KEY = "blocks.0.img.qkv.weight"  # lensforge's names before it adopted the released architecture


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int:
    """The step of a `step_XXXXXXXX` directory; ValueError for any other name."""
    match = STEP_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a step_XXXXXXXX checkpoint directory")
    return int(match.group(1))


class SamplingDefaults(BaseModel):
    """How a model is meant to be sampled, when not as a base model is: a distilled student's few steps without
    guidance (`lensforge distill`). `generate` and `evaluate` take them when --steps / --cfg are not given."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    cfg: float = Field(ge=0, allow_inf_nan=False)


def sampling_settings(spec: "CheckpointSpec", steps: int | None, cfg: float | None, default_steps: int,
                      default_cfg: float) -> tuple[int, float]:
    """(steps, guidance) to sample with: the ones asked for, else the model's own (a distilled student's), else
    the command's defaults."""
    own = spec.sampling
    return (steps if steps is not None else own.steps if own else default_steps,
            cfg if cfg is not None else own.cfg if own else default_cfg)


class CheckpointSpec(BaseModel):
    """What it takes to sample from a set of weights besides the weights."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig
    codec: str | None = "pixel"  # `inference.codecs.load_codec` spec; None: unknown (a bare transformer)
    text_encoder: str | None = "minilm"  # `inference.text.load_text_encoder` spec; None: unknown
    text_layers: tuple[int, ...] | None = None  # the encoder's layers, when the spec string does not say them
    text_date: str | None = None  # the chat template's date line the features were made with (GPT-OSS)
    sampling: SamplingDefaults | None = None  # None: a base model (generate's own defaults)


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """One safetensors file, written under a temporary name and renamed (a kill leaves the old file or the new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:  # a checkpoint's files are fsynced together (training/train_checkpoint.py)
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_weights(path: str | Path, state: dict[str, torch.Tensor], spec: CheckpointSpec) -> Path:
    """Write one safetensors file with the spec in its metadata."""
    return write_safetensors(path, state, {SPEC_KEY: spec.model_dump_json()})


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
    steps = [(step_of(p), p) for p in ckpts.glob("step_*") if STEP_DIR.match(p.name) and p.is_dir()]
    if not steps:
        raise FileNotFoundError(f"no checkpoints/step_* directory in run {run}")
    return max(steps)[1]


def pick_weights(step_dir: Path, names: tuple[str, str], prefer_ema: bool = True) -> Path | None:
    """The weights file of a step directory, `names` = (EMA file, raw file): the EMA one, else the raw one; with
    `prefer_ema` False the raw one only (a directory holding just the EMA file is refused, naming it: asked for
    the raw weights, silently sampling the EMA ones would be wrong). None when neither is there."""
    ema, raw = step_dir / names[0], step_dir / names[1]
    if prefer_ema:
        return next((p for p in (ema, raw) if p.is_file()), None)
    if not raw.is_file() and ema.is_file():
        raise FileNotFoundError(f"--no-ema: {step_dir} has no {raw.name}, only {ema.name} (the EMA weights); "
                                "drop --no-ema to use those")
    return raw if raw.is_file() else None


def resolve_checkpoint(run=None, checkpoint=None, prefer_ema: bool = True) -> tuple[Path, CheckpointSpec]:
    """The weights file to load and its spec: `run` → its latest step; `checkpoint` → a step dir or a file."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of a run directory or a checkpoint")
    where = latest_step_dir(run) if run is not None else Path(checkpoint)
    if where.is_file():
        weights = where
    elif where.is_dir():
        weights = pick_weights(where, WEIGHT_FILES, prefer_ema)
        if weights is None:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {where}")
    else:
        raise FileNotFoundError(f"checkpoint not found: {where}")
    return weights, read_spec(weights)


def read_spec(weights: str | Path, metadata: dict | None = None) -> CheckpointSpec:
    """The spec from the file's metadata (`metadata`: its header's, when already read), else from
    `model_config.json` beside it."""
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: only .safetensors checkpoints are loaded")
    raw = (read_header(weights)[1] if metadata is None else metadata).get(SPEC_KEY)
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


@dataclass(frozen=True)
class DenoiserSource:
    """Where a denoiser's weights are, how their keys are spelled, and what they are."""

    kind: str  # "lensforge" (a run, step directory or file of ours), "release", "transformer", "single-file",
    #            "lora" (a LoRA run's adapter: `files` are its base's)
    files: tuple[Path, ...]  # safetensors files holding the weights, together one state dict
    prefix: str  # carried by every key ('' or a single file's "model.diffusion_model.")
    spec: CheckpointSpec  # codec / text_encoder None where the source does not name them
    adapters: tuple[tuple[Path, float], ...] = ()  # LoRA files (inference/lora.py) merged in at load, with weights

    def with_adapters(self, adapters) -> "DenoiserSource":
        """This source with more LoRA (file, weight) pairs merged in at load."""
        return replace(self, adapters=self.adapters + tuple((Path(f), float(w)) for f, w in adapters))


def source_fingerprint(source: DenoiserSource) -> str:
    """One fingerprint of a source's weight files (`file_fingerprint` of each, hashed in order)."""
    digest = hashlib.sha256()
    for file in source.files:
        digest.update(file_fingerprint(file).encode())
    return digest.hexdigest()


def describe_denoiser(path: str | Path, prefer_ema: bool = True) -> DenoiserSource:
    """What `load_denoiser` would read at `path`: a lensforge run (its latest step), step directory or weights
    file; a Lens release root (`model_index.json`) or its `transformer/` folder (sharded + index, any size); a
    single-file DiT safetensors (keys bare or under `model.diffusion_model.`); a LoRA run, step directory or adapter
    file of ours (its base, as the run's `init_from` named it, with the adapter merged in)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"denoiser not found: {path}")
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = latest_step_dir(path)
    if path.is_dir():
        full = any((path / name).is_file() for name in WEIGHT_FILES)
        if not full and any((path / name).is_file() for name in lora.ADAPTER_FILES):
            return _adapter_source(pick_weights(path, lora.ADAPTER_FILES, prefer_ema))
    elif lora.is_adapter_file(path):
        return _adapter_source(path)
    if path.is_dir():
        if lens_format.is_release_root(path):
            return _release_source(path)
        if lens_format.is_transformer_dir(path):
            if lens_format.is_release_root(path.parent):
                return _release_source(path.parent)
            return _transformer_source(path)
        weights = pick_weights(path, WEIGHT_FILES, prefer_ema)
        if weights is None:
            raise FileNotFoundError(f"{path}: not a lensforge run or step directory (no checkpoints/, "
                                    f"{' or '.join(WEIGHT_FILES)}), a Lens release root (model_index.json) "
                                    "or a transformer/ folder (config.json)")
        return _file_source(weights)
    return _file_source(path)


def _adapter_source(adapter: Path) -> DenoiserSource:
    """A lensforge LoRA file → its base's source with the adapter attached; the base must be the one trained on."""
    _, meta = read_header(adapter)
    if lora.LORA_KEY not in meta:
        raise ValueError(f"{adapter}: a LoRA file that names no base; apply it to one with "
                         "`lensforge generate --checkpoint BASE --lora FILE`")
    info = lora.LoraInfo.model_validate_json(meta[lora.LORA_KEY])
    if not info.base or not Path(info.base).exists():
        raise FileNotFoundError(f"{adapter}: its base {info.base} (the run's init_from) is not on this machine; "
                                "apply it to a copy with `lensforge generate --checkpoint BASE --lora FILE`")
    base = describe_denoiser(info.base)
    if base.adapters:
        raise ValueError(f"{adapter}: its base {info.base} is itself a LoRA run; merge it first (lensforge export "
                         "--merge-lora) and train on the merged weights")
    found = source_fingerprint(base)
    if info.base_fingerprint and found != info.base_fingerprint:
        raise ValueError(f"{adapter}: its base {info.base} changed since the adapter was trained (fingerprint "
                         f"{found[:12]}, trained on {info.base_fingerprint[:12]})")
    spec = CheckpointSpec.model_validate_json(meta[SPEC_KEY]) if SPEC_KEY in meta else base.spec
    return replace(base, kind="lora", spec=spec, adapters=((adapter, 1.0),))


def _release_source(root: Path) -> DenoiserSource:
    lens_format.check_scheduler(root)  # the sampler is Lens's: refuse a release whose scheduler says otherwise
    config = lens_format.read_release_config(root / lens_format.TRANSFORMER_DIR)
    spec = CheckpointSpec(model=lens_format.model_config_from_release(config, name=root.name or "lens"),
                          codec=f"flux2:{root / 'vae'}", text_encoder=f"gpt-oss:{root}",
                          text_layers=tuple(config.get("selected_layer_index", GPT_OSS_LAYERS)))
    files = lens_format.transformer_files(root / lens_format.TRANSFORMER_DIR)
    return DenoiserSource("release", tuple(files), "", _stored_spec(files[0]) or spec)


def _transformer_source(folder: Path) -> DenoiserSource:
    config = lens_format.read_release_config(folder)
    files = lens_format.transformer_files(folder)
    spec = _stored_spec(files[0]) or CheckpointSpec(
        model=lens_format.model_config_from_release(config), codec=None, text_encoder=None,
        text_layers=tuple(config.get("selected_layer_index", ())) or None)
    return DenoiserSource("transformer", tuple(files), "", spec)


def _stored_spec(file: Path) -> CheckpointSpec | None:
    """The lensforge spec a file of ours carries in its safetensors metadata (exports keep it), else None."""
    raw = read_header(file)[1].get(SPEC_KEY)
    return CheckpointSpec.model_validate_json(raw) if raw else None


def _file_source(weights: Path) -> DenoiserSource:
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: only .safetensors checkpoints are loaded")
    entries, meta = read_header(weights)
    keys, shapes = list(entries), {k: e[1] for k, e in entries.items()}
    prefix = lens_format.strip_prefix(keys)
    if SPEC_KEY in meta or (weights.parent / SPEC_FILE).is_file():
        return DenoiserSource("lensforge", (weights,), prefix, read_spec(weights, meta))  # the header read once
    bare = {k[len(prefix):]: v for k, v in shapes.items()}
    if lens_format.CONFIG_METADATA_KEY in meta:
        config = json.loads(meta[lens_format.CONFIG_METADATA_KEY])
        model = lens_format.model_config_from_release(config, name=weights.stem)
    elif (weights.parent / lens_format.CONFIG_FILE).is_file():
        config = lens_format.read_release_config(weights.parent)
        model = lens_format.model_config_from_release(config, name=weights.stem)
    else:
        config, model = {}, lens_format.model_config_from_shapes(bare, name=weights.stem)
    layers = tuple(config.get("selected_layer_index", ())) or None
    return DenoiserSource("single-file", (weights,), prefix,
                          CheckpointSpec(model=model, codec=None, text_encoder=None, text_layers=layers))


def load_denoiser(path: str | Path, dtype: torch.dtype | None = None, device=None, prefer_ema: bool = True) -> MMDiT:
    """The MMDiT at `path` (anything `describe_denoiser` reads), in the file's dtype or `dtype`, on `device`."""
    return load_source(describe_denoiser(path, prefer_ema), dtype=dtype, device=device)


def load_source(source: DenoiserSource, dtype: torch.dtype | None = None, device=None) -> MMDiT:
    """Build on the meta device, then `assign` the file's tensors (inference/weights_io.py: read one at a time
    into their own allocations): no initialisation and no fp32 copy, so a bf16 load costs about the file's size."""
    with torch.device("meta"):
        model = MMDiT(source.spec.model)
    shapes = {k[len(source.prefix):]: e[1] for file in source.files for k, e in read_header(file)[0].items()}
    if LEGACY_KEY in shapes:
        raise ValueError(f"{source.files[0]}: a lensforge checkpoint from before the released Lens architecture "
                         "(blocks.N.img.*); it cannot be loaded: retrain it with this version")
    diff = state_diff({k: v.shape for k, v in model.state_dict().items()}, shapes)
    if diff:
        raise ValueError(f"{source.files[0]} does not fit model {source.spec.model.name!r}: {diff}")
    state = {k[len(source.prefix):]: t for file in source.files for k, t in read_tensors(file, dtype, device)}
    model.load_state_dict(state, strict=True, assign=True)
    if source.adapters:
        lora.merge_adapters(model, [(lora.read_adapter(f), w) for f, w in source.adapters])
    return model.eval()


def stored_dtype(source: DenoiserSource) -> torch.dtype:
    """The dtype the source's weights are stored in (its first tensor's), read from the header alone."""
    entries, _ = read_header(source.files[0])
    return next(iter(entries.values()))[0]


def load_model(weights: str | Path, spec: CheckpointSpec, device=None, dtype=torch.float32) -> MMDiT:
    """A lensforge weights file with its spec, strictly (a readable ValueError otherwise)."""
    prefix = lens_format.strip_prefix(read_header(weights)[0])
    return load_source(DenoiserSource("lensforge", (Path(weights),), prefix, spec), dtype=dtype, device=device)


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
