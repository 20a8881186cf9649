"""`lensforge export CKPT --out DIR [--format diffusers|single-file] [--dtype bfloat16] [--prefix P]`
`lensforge export LORA_CKPT --out DIR --lora [--prefix transformer.|diffusion_model.] [--dtype bfloat16]`
`lensforge export LORA_CKPT --out DIR --merge-lora [--format diffusers|single-file]`

CKPT: anything `lensforge generate --checkpoint` reads (a run, a step directory, a weights file, a Lens release
root or its transformer/ folder, a single file). Writes the released Lens layout, so diffusers'
`LensTransformer2DModel.from_pretrained(DIR/transformer)` (and ComfyUI) load what lensforge trained:

    diffusers     DIR/transformer/config.json + diffusion_pytorch_model[-0000K-of-0000N].safetensors (+ index)
    single-file   DIR/<name>.safetensors: the released keys (under --prefix, e.g. model.diffusion_model.), the
                  transformer config.json in its metadata

    --lora        DIR/pytorch_lora_weights.safetensors: a LoRA run's adapter in PEFT's keys under --prefix
                  (default `transformer.`, what diffusers' `load_lora_weights` / `load_lora_adapter` read;
                  `diffusion_model.` for ComfyUI's generic LoRA loader), α/r baked into lora_B so that loaders
                  that assume α = r apply it exactly
    --merge-lora  the base with the adapter merged, in --format's layout

Every file also carries lensforge's spec (codec, text encoder, prediction) in its metadata, which other loaders
ignore, so an export reads back into lensforge as it was. Without --dtype the weights keep their stored dtype, and
a release → lensforge → export round trip is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "export"
HELP = "write a checkpoint in the released Lens layout (diffusers transformer/ folder or one single file)"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="run, step directory, weights file, Lens release or "
                        "transformer/ folder, single file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    parser.add_argument("--prefix", default="", help="single-file key prefix, e.g. model.diffusion_model.")
    parser.add_argument("--max-shard-size", default="10GB", help="diffusers shard size (diffusers' default)")
    parser.add_argument("--no-ema", action="store_true", help="export model.safetensors even where EMA exists")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", action="store_true", help="a LoRA run: write only its adapter (diffusers' / "
                      "ComfyUI's LoRA format)")
    lora.add_argument("--merge-lora", action="store_true", help="a LoRA run: write its base with the adapter merged")


def text_layers(spec) -> list[int]:
    """The text encoder's layers for the config's `selected_layer_index` (only their count shapes the model)."""
    if spec.text_layers:
        return list(spec.text_layers)
    if spec.text_encoder:
        from inference.text import describe_text_encoder, resolve_text_spec

        try:
            return list(resolve_text_spec(spec.text_encoder).layers or
                        describe_text_encoder(spec.text_encoder)["layers"])
        except (OSError, ValueError):
            pass  # the encoder's files are not on this machine
    layers = list(range(spec.model.text_layers))
    print(f"export: the text encoder's layers are unknown; selected_layer_index = {layers}", file=sys.stderr)
    return layers


def export_adapter(source, out: Path, prefix: str, dtype) -> int:
    """The adapter in diffusers' / ComfyUI's keys, with diffusers' adapter metadata (r, α = r after baking)."""
    from inference.checkpoint import SPEC_KEY, write_safetensors
    from inference.lora import DIFFUSERS_FILE, DIFFUSERS_METADATA_KEY, LORA_KEY, export_state, read_adapter

    (path, _), = source.adapters
    adapter = read_adapter(path)
    state = export_state(adapter, prefix, dtype)
    rank = next(iter(adapter.modules.values()))[0].shape[0]
    meta_prefix = prefix.rstrip(".") + "." if prefix else ""
    metadata = {SPEC_KEY: source.spec.model_dump_json(),
                DIFFUSERS_METADATA_KEY: json.dumps({f"{meta_prefix}r": rank, f"{meta_prefix}lora_alpha": rank,
                                                    f"{meta_prefix}target_modules": sorted(adapter.modules)})}
    if adapter.info is not None:  # α = r: the scale is in lora_B now
        metadata[LORA_KEY] = adapter.info.model_copy(update={"alpha": float(rank)}).model_dump_json()
    written = write_safetensors(out / DIFFUSERS_FILE, state, metadata)
    print(json.dumps({"source": str(path), "base": [str(f) for f in source.files], "format": "lora",
                      "out": str(written), "prefix": prefix, "modules": len(adapter.modules), "rank": rank,
                      "parameters": adapter.parameters,
                      "bytes": sum(t.numel() * t.element_size() for t in state.values())}, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from inference.checkpoint import SPEC_KEY, describe_denoiser, load_source
    from inference.lens_format import TRANSFORMER_DIR, write_single_file, write_transformer_dir

    source = describe_denoiser(args.checkpoint, prefer_ema=not args.no_ema)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if (args.lora or args.merge_lora) and not source.adapters:
        raise ValueError(f"{args.checkpoint}: not a LoRA run or adapter; --lora and --merge-lora need one")
    if source.adapters and not (args.lora or args.merge_lora):
        raise ValueError(f"{args.checkpoint} is a LoRA run: --lora writes its adapter, --merge-lora the base with "
                         "it merged")
    if args.lora:
        return export_adapter(source, Path(args.out), args.prefix or "transformer.", dtype)
    model = load_source(source, dtype=dtype)
    spec, layers = source.spec, text_layers(source.spec)
    if spec.model.prediction != "velocity":
        print(f"export: this model predicts {spec.model.prediction!r}, not a velocity: the released pipeline "
              "would sample it wrongly; lensforge generate reads it right", file=sys.stderr)
    state = model.state_dict()
    metadata = {SPEC_KEY: spec.model_dump_json()}
    out = Path(args.out)
    if args.format == "diffusers":
        written = write_transformer_dir(state, spec.model, out / TRANSFORMER_DIR, layers, metadata,
                                        max_shard_size=args.max_shard_size)
    else:
        written = write_single_file(state, spec.model, out / f"{spec.model.name}.safetensors", layers, metadata,
                                    prefix=args.prefix)
    total = sum(t.numel() * t.element_size() for t in state.values())
    merged = [str(f) for f, _ in source.adapters]
    print(json.dumps({"source": [str(f) for f in source.files], "kind": source.kind, "format": args.format,
                      "out": str(written), "merged_lora": merged or None,
                      "parameters": sum(t.numel() for t in state.values()),
                      "bytes": total, "dtype": str(next(iter(state.values())).dtype)}, indent=1))
    return 0
