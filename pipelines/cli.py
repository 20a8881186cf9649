"""The `lensforge` command line. Each subcommand lives in `pipelines/commands/<name>.py` and exposes
`NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.

    lensforge --help
    lensforge curate --urls scenes/urls.parquet --out data --allow-hosts 127.0.0.1

Errors a user can fix (missing file, bad column, bad config, unknown preset) print one line and exit 2;
set LENSFORGE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from common.storage import is_remote, mirrored

# Import order is the order in `lensforge --help`.
COMMAND_MODULES = ["demo", "scenes", "serve_web", "curate", "serve_captioner", "caption", "precompute", "train",
                   "distill", "rl", "run", "models", "generate", "export", "evaluate", "ablate", "doctor"]


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """(the parser; {command: (run, the names of its arguments that may be object-store URLs)})."""
    parser = argparse.ArgumentParser(prog="lensforge", description="From web image URLs to a Lens-style checkpoint.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    runners = {}
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"pipelines.commands.{name}")
        # argparse %-formats help strings (not descriptions): a literal % ("95 % CIs") must be doubled there
        cmd = sub.add_parser(module.NAME, help=module.HELP.replace("%", "%%"), description=module.HELP)
        module.add_arguments(cmd)
        runners[module.NAME] = module.run, getattr(module, "STORAGE_ARGS", ())
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    run, storage_args = runners[args.command]
    try:
        with contextlib.ExitStack() as stack:  # DATA / RUN as s3://...: the command works on a synced local copy
            push = int(os.environ.get("RANK", 0)) == 0  # under torchrun rank 0 writes RUN, so it pushes
            for name in storage_args:
                if is_remote(getattr(args, name, None)):
                    setattr(args, name, stack.enter_context(mirrored(getattr(args, name), push=push)))
            return int(run(args) or 0)
    except KeyboardInterrupt:
        print("lensforge: interrupted; rerun the same command to finish what is left", file=sys.stderr)
        return 130
    except (OSError, ValueError, LookupError) as err:
        if os.environ.get("LENSFORGE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lensforge: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m pipelines.cli` (what torchrun runs)
    sys.exit(main())
