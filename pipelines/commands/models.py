"""`lensforge models`: every model preset with its parameter count, and the codecs and text encoders by name."""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list the model presets (with parameter counts), latent codecs and text encoders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the presets' full configs as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from inference.codecs import CODECS
    from inference.config import PRESETS
    from inference.mmdit import count_parameters
    from inference.text import TEXT_ENCODERS

    if args.json:
        out = {name: {**cfg.model_dump(), "mlp": cfg.mlp, "parameters": count_parameters(cfg)}
               for name, cfg in PRESETS.items()}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'preset':<11} {'parameters':>15}  {'blocks':>6} {'hidden':>6} {'heads':>9} {'mlp':>5} "
          f"{'trained at':>10}  text")
    for name, cfg in PRESETS.items():
        print(f"{name:<11} {count_parameters(cfg):>15,}  {cfg.depth:>6} {cfg.hidden:>6} "
              f"{cfg.heads:>4} × {cfg.head_dim:<2} {cfg.mlp:>5} {f'{cfg.base_size}²':>10}  "
              f"{cfg.text_layers} × {cfg.text_dim}")
    print("\ncodecs:")
    for name, text in CODECS.items():
        print(f"  {name:<9} {text}")
    print("text encoders:")
    for name, text in TEXT_ENCODERS.items():
        print(f"  {name:<9} {text}")
    return 0
