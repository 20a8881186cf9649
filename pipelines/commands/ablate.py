"""`lensforge ablate caption-density --data DATA --out DIR [--variants alt,short,dense,mixed,random-length]
[--world basic|rich] [--seeds 1] [--steps 600] [--preset tiny] [--sweep-words 8,16,32,64 [--sweep-base dense]
[--sweep-seeds 1]] [--time-every 25] [--per-category 16] [--sample-steps 25] [--cfg 4.0] [--eval-batch-size 16]
[--device auto] [--report-only] [--config F] [--set train.K=V]`

One model per caption arm, everything else equal, each scored for prompt adherence in three prompt styles; tables
and plots in DIR. Rerun the same command to finish an interrupted study or add seeds. Data preparation:
pipelines/ablate.py; the published study's budget: docs/ablations/caption-density/README.md.
"""

from __future__ import annotations

import argparse
import shlex

from pipelines.config import add_config_args, load_section

NAME = "ablate"
HELP = "ablation studies: caption-density (one model per caption variant, equal compute, adherence with 95 % CIs)"
STORAGE_ARGS = ("data", "out")  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def _words(text: str) -> list[int]:
    try:
        words = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of word counts") from None
    if not words or min(words) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: word counts must be positive integers")
    return words


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from inference.config import list_models
    from pipelines.ablate import (
        ARMS, DEFAULT_EVAL_BATCH, DEFAULT_PER_CATEGORY, DEFAULT_STEPS, DEFAULT_VARIANTS, STUDIES,
    )
    from scenes.scene import WORLDS

    parser.add_argument("study", choices=STUDIES, help="the study to run")
    parser.add_argument("--data", required=True, metavar="DATA", help="data directory with a shard set holding "
                        "every variant (DATA/shards/<set_id>), or one shard set directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="study directory (created; rerun to resume)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, metavar="V,...",
                        help=f"caption arms to compare (default {DEFAULT_VARIANTS}; "
                        f"{', '.join(f'{k} = {v}' for k, v in ARMS.items() if k != v)}); any variant or mix too: "
                        "`dense@15` (dense cut to 15 words), `mix:dense=0.7+alt=0.3`")
    parser.add_argument("--world", choices=WORLDS, default="basic", help="the scenes the data shows: the prompt "
                        "sets' world (rich: 80–120-word dense captions, scenes/README.md)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per arm (base seed + 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run (default "
                        f"{DEFAULT_STEPS}); overrides train.max_steps")
    parser.add_argument("--preset", choices=list_models(), default=None, help="model preset (default: the config's)")
    parser.add_argument("--sweep-words", type=_words, default=[], metavar="N,...",
                        help="also train on the --sweep-base caption cut to each word count and plot adherence "
                        "against words per caption (sweep.png)")
    parser.add_argument("--sweep-base", default="dense", help="the variant the sweep cuts (default dense)")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds per sweep run (default 1)")
    parser.add_argument("--time-every", type=int, default=25, metavar="N",
                        help="the time-matched view: a checkpoint every N steps, the one nearest the fastest arm's "
                        "training time scored on dense prompts (default 25; 0: off)")
    parser.add_argument("--per-category", type=int, default=DEFAULT_PER_CATEGORY,
                        help=f"adherence prompts per category and evaluation (default {DEFAULT_PER_CATEGORY})")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the evaluation")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance of the evaluation")
    parser.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH, help="images per sampling batch "
                        f"(default {DEFAULT_EVAL_BATCH}; larger on a GPU)")
    parser.add_argument("--device", default="auto", help="evaluation device (training: train.device)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables and plots from what is "
                        "finished; train and score nothing")
    add_config_args(parser)  # the recipe: the `train:` section of --config, by default configs/demo.yaml


def check_args(args: argparse.Namespace) -> None:
    for name in ("seeds", "steps", "sweep_seeds", "per_category", "sample_steps", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.time_every < 0:
        raise ValueError("--time-every must be ≥ 0")
    if args.cfg < 0:
        raise ValueError("--cfg must be ≥ 0")
    from pipelines.ablate import study_variants

    study_variants(args.variants, args.sweep_words, args.sweep_base)  # one-line errors before any work


def command_line(args: argparse.Namespace) -> str:
    """The full command with every setting spelled out: rerunning it redoes exactly this study."""
    parts = ["lensforge", NAME, args.study, "--data", args.data, "--out", args.out, "--variants", args.variants,
             "--world", args.world, "--seeds", str(args.seeds), "--steps", str(args.steps)]
    if args.preset:
        parts += ["--preset", args.preset]
    if args.sweep_words:
        parts += ["--sweep-words", ",".join(map(str, args.sweep_words)), "--sweep-base", args.sweep_base,
                  "--sweep-seeds", str(args.sweep_seeds)]
    parts += ["--time-every", str(args.time_every)]
    parts += ["--per-category", str(args.per_category), "--sample-steps", str(args.sample_steps), "--cfg",
              f"{args.cfg:g}", "--eval-batch-size", str(args.eval_batch_size), "--device", args.device]
    if args.config:
        parts += ["--config", args.config]
    for override in args.overrides:
        parts += ["--set", override]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from pipelines.ablate import AblateSettings, run_ablation
    from pipelines.demo import DEMO_CONFIG

    check_args(args)
    config = args.config or str(DEMO_CONFIG)
    base = load_section("train", config, args.overrides, reads=("train",), preset=args.preset)
    settings = AblateSettings(
        study=args.study, variants=[v.strip() for v in args.variants.split(",") if v.strip()], seeds=args.seeds,
        steps=args.steps, world=args.world, sweep_words=args.sweep_words, sweep_base=args.sweep_base,
        sweep_seeds=args.sweep_seeds, time_every=args.time_every, per_category=args.per_category,
        sample_steps=args.sample_steps, cfg=args.cfg, eval_batch_size=args.eval_batch_size, device=args.device)
    readme = run_ablation(settings, base, args.data, args.out, config, command_line(args), args.report_only)
    print(f"ablate: done → {readme}")
    return 0
