"""`lensforge caption --data DATA --base-url URL --model MODEL [--variants dense,short] [--config F]
[--max-cost-usd X] [--dry-run] [--batch-api] [--workers N] [--concurrency N]`

Re-captions every kept image of DATA/manifest into DATA/captions/part-*.parquet; rerun the same command to finish
what is left. The API key is read from the environment variable named by caption.api_key_env (OPENAI_API_KEY).
SIGTERM / SIGINT stop it cleanly (the requests in flight get caption.drain_s) with exit code 143 / 130.
Before any work the endpoint is probed once (captioning/client.py's probe_endpoint): a refused connection, a wrong
path (404) or a rejected key ends the command in one line with exit code 2, before any row is written.
"""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args, load_section, save_resolved

NAME = "caption"
HELP = "caption every kept image with an OpenAI-compatible VLM into DATA/captions (resumable, budgeted)"
STORAGE_ARGS = ("data",)  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from captioning.presets import list_presets

    parser.add_argument("--data", required=True, metavar="DATA", help="data directory with a manifest (curate); a path or s3://)")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--model", default=None, help="model name, e.g. gpt-4.1-mini")
    parser.add_argument("--variants", default=None, metavar="V,...",
                        help=f"caption presets ({', '.join(list_presets())}) or name=path/to/prompt.txt")
    parser.add_argument("--max-cost-usd", type=float, default=None,
                        help="stop cleanly before DATA/captions' total spend (all runs) would exceed this")
    parser.add_argument("--dry-run", action="store_true", help="estimate tokens and cost of the job; send nothing")
    parser.add_argument("--batch-api", action="store_true", default=None,
                        help="use the OpenAI Batch API (half price, results within 24 h)")
    parser.add_argument("--batch-offline-dir", default=None, metavar="DIR",
                        help="with --batch-api: write the Batch API JSONL into DIR for an offline engine "
                             "(e.g. `vllm run-batch -i DIR/x.jsonl -o out.jsonl`) and exit")
    parser.add_argument("--batch-offline-results", default=None, metavar="FILE",
                        help="with --batch-api: merge an offline engine's output JSONL into DATA/captions")
    parser.add_argument("--workers", type=int, default=None, help="Ray workers, each with its own event loop")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight per worker")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (with --workers > 1)")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    """One captioning writer per DATA (a second run would ask and pay for the same keys); a dry run reads only."""
    from common.data_lock import data_lock

    if args.dry_run:
        return _run(args)
    with data_lock(args.data, "caption"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from captioning.client import probe_endpoint
    from captioning.pipeline import caption
    from captioning.worker import Stopped

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    cfg = load_section("caption", args.config, args.overrides, reads=("caption",), base_url=args.base_url,
                       model=args.model, variants=variants, max_cost_usd=args.max_cost_usd, batch_api=args.batch_api,
                       workers=args.workers, concurrency=args.concurrency,
                       ray_address=args.ray_address)
    if not cfg.model and cfg.azure is None:
        raise ValueError("no model: pass --model (e.g. gpt-4.1-mini) or set caption.model")
    if cfg.batch_api and not args.dry_run:
        return run_batch_api(args, cfg)
    if args.dry_run:  # sends nothing, so needs no endpoint
        caption(args.data, cfg, dry=True)
        return 0
    probe_endpoint(cfg)
    save_resolved(cfg, "caption", args.data)  # beside config.curate.yaml: DATA/captions holds Parquet parts only
    try:
        caption(args.data, cfg)
    except Stopped as stop:  # every answer is saved and the one-line account printed
        return stop.exit_code
    report_captions(args.data)
    return 0


def run_batch_api(args: argparse.Namespace, cfg) -> int:
    """The Batch API path (captioning/batch.py): online batches, or JSONL files for an offline engine."""
    from captioning import batch
    from captioning.client import probe_endpoint

    if not (args.batch_offline_dir or args.batch_offline_results):  # an offline engine's files need no endpoint
        probe_endpoint(cfg, batch=True)
    save_resolved(cfg, "caption", args.data)  # beside config.curate.yaml: DATA/captions holds Parquet parts only
    if args.batch_offline_dir:
        files = batch.write_batch_input(args.data, cfg, args.batch_offline_dir)
        print(f"caption: {len(files)} request file(s) in {args.batch_offline_dir}; merge the engine's output with "
              "--batch-api --batch-offline-results FILE")
        return 0
    if args.batch_offline_results:
        merged = batch.read_batch_output(args.batch_offline_results, args.data, cfg)
        print(f"caption: merged {merged['rows']} row(s) ({merged['ok']} ok) from {args.batch_offline_results}")
    else:
        batch.run_batch(args.data, cfg)
    report_captions(args.data)
    return 0


def report_captions(data) -> None:
    """The statistics in the terminal and DATA/reports/captions.html."""
    from captioning.stats import caption_stats, format_stats, write_captions_report

    print(format_stats(caption_stats(data)))
    print(f"caption: report at {write_captions_report(data)}")
