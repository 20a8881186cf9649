"""`lensforge demo [--out DIR] [--config configs/demo.yaml]` — the offline demo (`make demo`)."""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args

NAME = "demo"
HELP = "run the embedded offline demo on synthetic scenes served over loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    run_demo(args.out, args.config, args.overrides)
    return 0
