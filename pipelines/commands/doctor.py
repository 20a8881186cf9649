"""`lensforge doctor [--config F] [--out DIR] [--ray-address ADDR] [--online] [--json]`

Checks this machine for a lensforge run and prints ok / warning / missing with what to do (pipelines/doctor.py):
Python and key package versions, GPUs, Ray, free disk at --out, NO_ALBUMENTATIONS_UPDATE where img2dataset is
imported; with --config, the weights paths and the captioning endpoint. Exit code 1 when something required is
missing, else 0 (warnings included).
"""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args

NAME = "doctor"
HELP = "check this machine (packages, GPU, Ray, disk, and with --config the weights and caption endpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".", metavar="DIR", help="where DATA or RUN will go: free disk is checked "
                        "there (default: the current directory)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="check that this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) accepts connections; "
                             "nothing is started or joined")
    parser.add_argument("--online", action="store_true",
                        help="also contact a remote caption endpoint or cluster (default: loopback addresses only)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds per network check")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    from pipelines.doctor import as_json, exit_code, format_table, run_checks

    rows = run_checks(args.out, args.config, args.overrides, args.ray_address, not args.online, args.timeout)
    print(as_json(rows) if args.json else format_table(rows))
    return exit_code(rows)
