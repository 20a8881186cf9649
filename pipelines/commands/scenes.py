"""`lensforge scenes render`: a URL list of synthetic scenes with web faults, for the demo and the tests.

    lensforge scenes render --n 2000 --out data/web --faults 0.1
    lensforge serve-web data/web --port 8000
    lensforge scenes prompts --out rl/train.jsonl --categories colors,position --per-category 64 --seed 1

`prompts` writes adherence prompts with their category and target scene as JSONL, the file `lensforge rl` trains
on (training/rl_prompts.py). Its default seed (1) is not `lensforge evaluate`'s (0): no evaluation prompt is
trained on.
"""

from __future__ import annotations

import argparse

from pipelines.config import add_config_args, load_section, save_resolved

NAME = "scenes"
HELP = "render the synthetic scene world (images, ground truth, urls.parquet with web faults)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scenes_command", metavar="ACTION")
    sub.required = True
    render = sub.add_parser("render", help="render N scenes into OUT (images/, scenes/, urls.parquet, _serve.json)")
    render.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    # Defaults stay None so that --config / --set values win unless a flag is given.
    render.add_argument("--n", type=int, default=None, help="rows in urls.parquet, faulty ones included (2000)")
    render.add_argument("--size", type=int, default=None, help="side of the square renders in pixels (256)")
    render.add_argument("--seed", type=int, default=None, help="random seed; same seed, same bytes (0)")
    render.add_argument("--faults", type=float, default=None, help="fraction of rows with a web fault (0.1)")
    render.add_argument("--base-url", default=None, help="URL prefix in urls.parquet (http://127.0.0.1:8000)")
    add_config_args(render)
    prompts = sub.add_parser("prompts", help="write adherence prompts with their category and scene (JSONL) for rl")
    prompts.add_argument("--out", required=True, metavar="FILE", help="the .jsonl file to write")
    prompts.add_argument("--categories", default=None, help="comma-separated adherence categories (default: all)")
    prompts.add_argument("--per-category", type=int, default=32)
    prompts.add_argument("--style", default="dense", help="caption style of the prompts (dense)")
    prompts.add_argument("--seed", type=int, default=1, help="prompt seed; evaluate uses 0 (default 1)")


def run(args: argparse.Namespace) -> int:
    if args.scenes_command == "prompts":
        return write_prompt_file(args)
    from scenes.dataset import fault_counts, render_dataset

    cfg = load_section("scenes", args.config, args.overrides, reads=("scenes",), n=args.n, size=args.size,
                       seed=args.seed, faults=args.faults, base_url=args.base_url)
    urls = render_dataset(cfg, args.out)
    save_resolved(cfg, "scenes", args.out)
    counts = fault_counts(urls)
    faulty = ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items()) if kind != "normal")
    print(f"rendered {cfg.n} rows into {urls}: {counts['normal']} normal, {cfg.n - counts['normal']} faulty"
          + (f" ({faulty})" if faulty else ""))
    return 0


def write_prompt_file(args: argparse.Namespace) -> int:
    from scenes.adherence import CATEGORIES, prompt_set
    from training.rl_prompts import RLPrompt, write_prompts

    if not str(args.out).endswith(".jsonl"):
        raise ValueError(f"--out {args.out}: a .jsonl file (the category and scene travel with each prompt)")
    categories = args.categories.split(",") if args.categories else list(CATEGORIES)
    items = prompt_set(per_category=args.per_category, seed=args.seed, style=args.style, categories=categories)
    path = write_prompts(args.out, [RLPrompt(it.prompt, it.category, it.scene) for it in items])
    print(f"{len(items)} prompts ({', '.join(categories)}; seed {args.seed}) → {path}")
    return 0
