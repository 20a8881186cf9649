"""`lensforge precompute --data DATA [--codec pixel|flux2:PATH] [--text-encoder NAME|PATH] [--variants dense,short,alt]
[--caption-model MODEL] [--config F] [--ray-address ADDR]`"""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args, load_section

NAME = "precompute"
HELP = "encode kept, captioned images into aspect-bucketed training shards (latents + text features) on Ray"
STORAGE_ARGS = ("data",)  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DATA", help="data directory of curate + caption; a path or s3://)")
    parser.add_argument("--codec", default=None, help="pixel | pixel:F | flux2:PATH (default: the config's, pixel)")
    parser.add_argument("--text-encoder", default=None, metavar="NAME|PATH",
                        help="minilm | hf:PATH[@layers] | gpt-oss:PATH[@layers] (default: the config's, minilm)")
    parser.add_argument("--variants", default=None, metavar="V,...",
                        help="caption variants to encode, e.g. dense,short,alt (alt = the original alt text; "
                        "dense@15 = the dense caption cut to its first 15 words)")
    parser.add_argument("--caption-model", default=None, metavar="MODEL",
                        help="encode this captioner's captions (default: the only one DATA holds)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local runtime")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    from common.data_lock import data_lock
    from training.precompute import precompute

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    cfg = load_section("precompute", args.config, args.overrides, reads=("precompute",), codec=args.codec,
                       text_encoder=args.text_encoder, variants=variants, caption_model=args.caption_model)
    with data_lock(args.data, "precompute"):
        precompute(args.data, cfg, ray_address=args.ray_address)
    return 0
