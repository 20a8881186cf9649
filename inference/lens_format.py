"""The released Lens layout, read and written: one owner for its file names, config fields and key prefixes.

    LENS_DIR/model_index.json                         a release root (diffusers layout)
    LENS_DIR/transformer/config.json                  `LensTransformer2DModel` config (fields: RELEASE_FIELDS)
    LENS_DIR/transformer/diffusion_pytorch_model-0000K-of-0000N.safetensors  + ….safetensors.index.json
    LENS_DIR/vae/, text_encoder/, tokenizer/, scheduler/

    cfg = model_config_from_release(json.load(open("LENS_DIR/transformer/config.json")))
    files = transformer_files("LENS_DIR/transformer")        # the shards, in index order
    write_transformer_dir(state, cfg, "OUT/transformer", layers=[5, 11, 17, 23])
    write_single_file(state, cfg, "OUT/lens.safetensors", layers=[5, 11, 17, 23], metadata={...})

lensforge's parameter names ARE the released names (inference/mmdit.py), so no key map exists; a single-file DiT
(ComfyUI's layout) may carry them under `model.diffusion_model.`, which `SINGLE_FILE_PREFIXES` strips.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import atomic_path, write_json
from inference.config import ModelConfig
from inference.text import GPT_OSS_LAYERS

CLASS_NAME = "LensTransformer2DModel"
MODEL_INDEX = "model_index.json"
TRANSFORMER_DIR = "transformer"
CONFIG_FILE = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # huggingface_hub's sharding names the parts
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
CONFIG_METADATA_KEY = "config"  # a single file carries the transformer config.json under this metadata key
# The fields of the released transformer config (../shared/lens-release/transformer_config.json).
RELEASE_FIELDS = ("attention_head_dim", "axes_dims_rope", "enc_hidden_dim", "gate_mlp", "in_channels", "inner_dim",
                  "multi_layer_encoder_feature", "num_attention_heads", "num_layers", "out_channels", "patch_size",
                  "rms_norm", "selected_layer_index")
LENS_AXES = {64: (8, 28, 28)}  # RoPE split of a head, when a single file gives no config
# The released checkpoint's transformer/, vae/ and scheduler/ config.json (copies of ../shared/lens-release/): the
# full-size VAE for bench/gpu.py, the fields for the tests.
RELEASE_CONFIGS = Path(__file__).parent / "lens_release"


def release_config(cfg: ModelConfig, layers: list[int] | tuple[int, ...]) -> dict:
    """The `LensTransformer2DModel` config.json of a lensforge model config. `layers`: the text encoder's 0-based
    layers (the release's `selected_layer_index`; only their count shapes the transformer)."""
    import diffusers

    if len(layers) != cfg.text_layers:
        raise ValueError(f"{len(layers)} text layers {list(layers)} for a model of {cfg.text_layers}")
    return {
        "_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__,
        "attention_head_dim": cfg.head_dim, "axes_dims_rope": list(cfg.rope_axes), "enc_hidden_dim": cfg.text_dim,
        "gate_mlp": True, "in_channels": cfg.token_channels, "inner_dim": cfg.hidden,
        "multi_layer_encoder_feature": True, "num_attention_heads": cfg.heads, "num_layers": cfg.depth,
        "out_channels": cfg.in_channels, "patch_size": cfg.patch, "rms_norm": True,
        "selected_layer_index": [int(i) for i in layers],
    }


def model_config_from_release(config: dict, name: str = "lens", base_size: int = 1024) -> ModelConfig:
    """A released transformer config.json → ModelConfig (any size). Refuses variants the class allows but Lens
    does not use (LayerNorm blocks, GELU MLP, one text layer), naming the field."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"transformer config is a {config.get('_class_name')}, not a {CLASS_NAME}")
    for field, want in ("gate_mlp", True), ("rms_norm", True), ("multi_layer_encoder_feature", True):
        if config.get(field, True) != want:
            raise ValueError(f"transformer config has {field}={config[field]}: lensforge runs Lens's {field}={want}")
    patch, tokens = int(config.get("patch_size", 2)), int(config.get("in_channels", 128))
    out = int(config.get("out_channels") or tokens)
    if out * patch * patch != tokens:
        raise ValueError(f"transformer config: in_channels {tokens} ≠ out_channels {out} × patch_size² {patch}²")
    heads, head_dim = int(config.get("num_attention_heads", 24)), int(config.get("attention_head_dim", 64))
    if config.get("inner_dim", heads * head_dim) != heads * head_dim:  # the class ignores inner_dim: say so
        raise ValueError(f"transformer config: inner_dim {config['inner_dim']} ≠ heads × head_dim "
                         f"{heads} × {head_dim} (the released class uses the product)")
    return ModelConfig(
        name=name, depth=int(config.get("num_layers", 48)), hidden=heads * head_dim, heads=heads, head_dim=head_dim,
        in_channels=out, patch=patch, text_dim=int(config.get("enc_hidden_dim", 2880)),
        text_layers=len(config.get("selected_layer_index", GPT_OSS_LAYERS)),
        rope_axes=tuple(config.get("axes_dims_rope", (8, 28, 28))), base_size=base_size,
    )


def model_config_from_shapes(shapes: dict[str, tuple[int, ...]], name: str = "lens") -> ModelConfig:
    """A ModelConfig inferred from a bare state dict's shapes (a single file without a config): depth, width,
    heads (from the QK-norm width), text layers and width; patch 2 and Lens's RoPE split are assumed."""
    try:
        hidden, tokens = shapes["img_in.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        text_layers = sum(1 for k in shapes if k.startswith("txt_norm.") and k.endswith(".weight"))
        text_dim = shapes["txt_norm.0.weight"][0]
    except KeyError as err:
        raise ValueError(f"not a Lens transformer state dict: no {err.args[0]}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks."))
    if head_dim not in LENS_AXES or tokens % 4:
        raise ValueError(f"a single file of head width {head_dim} and {tokens}-value tokens needs its config.json")
    return ModelConfig(name=name, depth=depth, hidden=hidden, heads=hidden // head_dim, head_dim=head_dim,
                       in_channels=tokens // 4, patch=2, text_dim=text_dim, text_layers=text_layers,
                       rope_axes=LENS_AXES[head_dim])


def strip_prefix(keys) -> str:
    """The single-file prefix every key carries ('' when the keys are bare)."""
    keys = list(keys)
    for prefix in SINGLE_FILE_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def is_release_root(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file() and (path / TRANSFORMER_DIR / CONFIG_FILE).is_file()


def is_transformer_dir(path: Path) -> bool:
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("_class_name") == CLASS_NAME
    except ValueError:
        return False


def transformer_files(folder: Path) -> list[Path]:
    """The weight files of a transformer folder: the index's shards (in order), else the one file."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
    elif (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{folder}: no {INDEX_NAME} and no {WEIGHTS_NAME}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the index names {len(missing)} missing shard(s): {', '.join(missing[:3])}")
    return files


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# What inference/flow.py's sampler is: FlowMatchEulerDiscreteScheduler with exponential dynamic shifting, the
# Lens pipeline passing μ (FLUX.2's empirical fit) on linspace(1, 1/N, N); these settings must hold for it to apply.
SCHEDULER_EXPECTS = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                     "time_shift_type": "exponential", "num_train_timesteps": 1000, "invert_sigmas": False,
                     "shift_terminal": None, "stochastic_sampling": False, "use_karras_sigmas": False,
                     "use_exponential_sigmas": False, "use_beta_sigmas": False}


def check_scheduler(root: Path) -> dict:
    """A release's scheduler config, refused (naming the field) when lensforge's sampler is not what it says; a
    release without one gets Lens's (`lens_release/scheduler_config.json`)."""
    path = Path(root) / SCHEDULER_CONFIG
    config = json.loads((path if path.is_file() else RELEASE_CONFIGS / "scheduler_config.json").read_text())
    wrong = [f"{k}={config[k]!r}" for k, v in SCHEDULER_EXPECTS.items() if k in config and config[k] != v]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}; lensforge samples Lens's schedule only "
                         f"({', '.join(f'{k}={v!r}' for k, v in SCHEDULER_EXPECTS.items())})")
    return config


def read_release_config(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


# --- writing -------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    write_json(path, obj, indent=2, sort_keys=True)  # diffusers' own layout


def write_transformer_dir(state: dict, cfg: ModelConfig, out: str | Path, layers, metadata: dict | None = None,
                          max_shard_size: str | int = "10GB") -> Path:
    """The released `transformer/` folder: config.json + sharded safetensors + index (diffusers' own layout and
    default shard size, via huggingface_hub's splitter); a model under the limit is one unsharded file."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        with atomic_path(out / filename) as tmp:
            save_file({n: state[n].contiguous() for n in names}, str(tmp),
                      metadata={"format": "pt", **(metadata or {})})
    if split.is_sharded:
        _write_json(out / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    _write_json(out / CONFIG_FILE, release_config(cfg, layers))
    return out


def write_single_file(state: dict, cfg: ModelConfig, out: str | Path, layers, metadata: dict | None = None,
                      prefix: str = "") -> Path:
    """One safetensors file of the released names (optionally under `prefix`, e.g. ComfyUI's
    `model.diffusion_model.`) with the transformer config.json in its metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(release_config(cfg, layers), sort_keys=True),
            **(metadata or {})}
    with atomic_path(out) as tmp:
        save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return out
