"""`lensforge demo [--out DIR] [--config configs/demo.yaml] [--from STAGE] [--until STAGE]` — the offline demo
(`make demo`). Rerunning it skips what is finished and completes the rest."""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args
from pipelines.run_config import STAGES

NAME = "demo"
HELP = "run the embedded offline demo on synthetic scenes served over loopback, through training and a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument("--from", dest="start", choices=STAGES, default=None,
                        help="start at this stage, rerunning it even if it is up to date")
    parser.add_argument("--until", dest="stop", choices=STAGES, default=None, help="stop after this stage")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    run_demo(args.out, args.config, args.overrides, start=args.start, stop=args.stop)
    return 0
