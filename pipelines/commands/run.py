"""`lensforge run PIPELINE.yaml [--out DIR] [--from STAGE] [--until STAGE] [--set SECTION.KEY=VALUE]`

Curate → caption → precompute → train → sample → report from one pipeline file (a section per stage plus `run:`,
see pipelines/run_config.py). Finished stages are skipped; rerun the same command after a crash to finish.
"""

from __future__ import annotations

import argparse

from pipelines.run_config import STAGES

NAME = "run"
HELP = "run the whole pipeline from one YAML file (curate → caption → precompute → train → sample → report)"
STORAGE_ARGS = ("out",)  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", metavar="PIPELINE.yaml", help="pipeline file: sections curate, caption, "
                        "precompute, train and run")
    parser.add_argument("--out", default=None, metavar="DIR", help="output root (default: run.out)")
    parser.add_argument("--from", dest="start", choices=STAGES, default=None,
                        help="start at this stage, rerunning it even if it is up to date")
    parser.add_argument("--until", dest="stop", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="dotted override, e.g. --set train.max_steps=2000 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from pipelines.run import run_pipeline

    plan = run_pipeline(args.pipeline, args.overrides, out=args.out, start=args.start, stop=args.stop)
    if plan.report.exists():
        print(f"run: report at {plan.report}")
    return 0
