"""`lensforge serve-web DIR`: serve a rendered scene folder over loopback HTTP, faults and all.

    lensforge serve-web data/web --port 8000
"""

from __future__ import annotations

import argparse

NAME = "serve-web"
HELP = "serve a `lensforge scenes render` folder over HTTP (loopback only unless forced)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder written by `lensforge scenes render`")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="bind a non-loopback address anyway (the folder holds decompression bombs)")


def run(args: argparse.Namespace) -> int:
    from scenes.serve import serve_forever

    serve_forever(args.dir, args.host, args.port, force=args.allow_non_loopback)
    return 0
