"""`lensforge serve-captioner`: the local OpenAI-compatible captioning endpoint, for the demo, tests and benchmarks.

    lensforge serve-captioner --port 8001
    lensforge serve-captioner --port 8001 --api-key sk-local --latency-s 0.2 --rate-429 0.05 --seed 1
    lensforge serve-captioner --port 8001 --world rich      # parse and describe the rich scene world
    curl -X POST localhost:8001/_lensforge/faults -d '{"script": ["429", "ok"], "retry_after_s": 1}'

It knows ONLY lensforge's synthetic scenes: it parses each image back into a scene and describes it; it is not a
vision model (see captioning/endpoint/__init__.py).
"""

from __future__ import annotations

import argparse
import typing

NAME = "serve-captioner"
HELP = ("serve a local OpenAI-compatible captioning endpoint (chat completions, files, batches) that knows ONLY "
        "lensforge's synthetic scenes: it parses each image with scenes.parse and captions it with scenes.describe "
        "at the density the prompt asks for; not a vision model. Seeded fault and latency injection")
EPILOG = ("Fault settings can be changed while it runs: POST /_lensforge/faults with a JSON object of the same "
          "names (rate_429, script, ...); GET /_lensforge/stats counts requests; POST /_lensforge/reset restores "
          "the starting settings. Script outcomes: ok, 429, 500, timeout, malformed, refusal, truncate, empty, 401.")


def _fault_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Faults` field (--rate-429, --latency-s, ...), typed and described by the field itself."""
    from captioning.endpoint.faults import OUTCOMES, Faults

    group = parser.add_argument_group("faults and latency (also POST /_lensforge/faults at runtime)")
    for name, info in Faults.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        if name == "script":
            group.add_argument(flag, type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                               default=[], metavar="OUTCOME,...",
                               help=f"{info.description} (comma-separated: {', '.join(OUTCOMES)})")
        elif name == "batch_status":
            choices = typing.get_args(typing.get_args(info.annotation)[0])
            group.add_argument(flag, choices=choices, default=None, help=info.description)
        else:
            group.add_argument(flag, type=type(default), default=default,
                               help=f"{info.description} (default {default})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--port", type=int, default=8001, help="port (default 8001; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="bind a non-loopback address anyway (the fault and reset routes are open)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 routes (never printed or logged)")
    parser.add_argument("--models", default=None, metavar="ID,...",
                        help="model ids to serve (default gpt-4.1,gpt-4.1-mini,gpt-4.1-nano,lensforge-scenes)")
    parser.add_argument("--state-dir", default=None,
                        help="keep uploaded files and batches here across restarts (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=None, help="threads that decode and parse images")
    parser.add_argument("--world", choices=("basic", "rich"), default="basic",
                        help="scene world the images come from (scenes/scene.py; default basic)")
    _fault_flags(parser)


def options(args: argparse.Namespace) -> dict:
    """start_endpoint/serve keywords from parsed arguments."""
    from captioning.endpoint.app import DEFAULT_MODELS
    from captioning.endpoint.faults import Faults

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(DEFAULT_MODELS)
    faults = {name: getattr(args, name) for name in Faults.model_fields}
    return {"api_key": args.api_key, "models": models, "state_dir": args.state_dir, "workers": args.workers,
            "world": args.world, "allow_non_loopback": args.allow_non_loopback, **faults}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from captioning.endpoint.server import serve

    try:
        serve(args.host, args.port, **options(args))
    except ValidationError as err:  # e.g. rates adding up to more than 1: a fixable user error
        raise ValueError(f"bad fault settings: {err.errors(include_url=False)[0]['msg']}") from None
    except KeyboardInterrupt:
        return 0
    return 0
