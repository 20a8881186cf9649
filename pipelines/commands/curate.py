"""`lensforge curate --urls URLS --out DATA [--add] [--config F] [--ray-address ADDR] [--allow-hosts H,...]`"""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args, load_section, save_resolved

NAME = "curate"
HELP = "download (img2dataset on Ray), filter and deduplicate a URL list into DATA/manifest"
STORAGE_ARGS = ("out",)  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--urls", required=True, help="Parquet/CSV/JSONL file or folder with a url column (a path or s3://)")
    parser.add_argument("--out", required=True, metavar="DATA", help="data directory, a path or s3://bucket/prefix (created; resumable)")
    parser.add_argument("--add", action="store_true",
                        help="add URLS to a DATA that holds another list: deduplicated against what it kept")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local runtime")
    parser.add_argument("--allow-hosts", default=None, metavar="H,...",
                        help="hosts/IPs/CIDRs admitted although non-public (e.g. 127.0.0.1 for local data)")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    from common.data_lock import data_lock
    from curation.pipeline import curate

    allow = [h.strip() for h in args.allow_hosts.split(",") if h.strip()] if args.allow_hosts else None
    cfg = load_section("curate", args.config, args.overrides, reads=("curate",), allow_hosts=allow)
    with data_lock(args.out, "curate"):
        save_resolved(cfg, "curate", args.out)
        curate(args.urls, args.out, cfg, ray_address=args.ray_address, add=args.add)
    return 0
