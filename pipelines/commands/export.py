"""`lensforge export CKPT --out DIR [--format diffusers|single-file] [--dtype bfloat16] [--prefix P]`

CKPT: anything `lensforge generate --checkpoint` reads (a run, a step directory, a weights file, a Lens release
root or its transformer/ folder, a single file). Writes the released Lens layout, so diffusers'
`LensTransformer2DModel.from_pretrained(DIR/transformer)` (and ComfyUI) load what lensforge trained:

    diffusers     DIR/transformer/config.json + diffusion_pytorch_model[-0000K-of-0000N].safetensors (+ index)
    single-file   DIR/<name>.safetensors: the released keys (under --prefix, e.g. model.diffusion_model.), the
                  transformer config.json in its metadata

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


def run(args: argparse.Namespace) -> int:
    import torch

    from inference.checkpoint import SPEC_KEY, describe_denoiser, load_source
    from inference.lens_format import TRANSFORMER_DIR, write_single_file, write_transformer_dir

    source = describe_denoiser(args.checkpoint, prefer_ema=not args.no_ema)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
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
    print(json.dumps({"source": [str(f) for f in source.files], "kind": source.kind, "format": args.format,
                      "out": str(written), "parameters": sum(t.numel() for t in state.values()),
                      "bytes": total, "dtype": str(next(iter(state.values())).dtype)}, indent=1))
    return 0
