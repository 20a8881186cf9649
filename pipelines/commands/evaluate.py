"""`lensforge evaluate (--run RUN | --checkpoint DIR) --out DIR [--per-category 32] [--style dense] [--size 32]
[--steps 25] [--cfg 4.0] [--seed 0]` (a distilled student's checkpoint gives its own default steps and CFG)

GenEval-like prompt adherence on the synthetic scenes (`scenes.adherence`): samples one image per held-out prompt,
parses it back and scores six categories with bootstrap 95 % intervals and the shuffled-prompt chance level.
Writes OUT/adherence.json (settings, scores, every item with its parsed scene), OUT/adherence.md (the table) and
OUT/samples_<category>.png (that category's samples in prompt order).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

NAME = "evaluate"
HELP = "prompt adherence of a checkpoint on the synthetic scenes (GenEval-like categories, CIs, chance level)"
DEFAULT_STEPS, DEFAULT_CFG = 25, 4.0  # unless the checkpoint says its own (a distilled student: 4 steps, CFG 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scenes.describe import STYLES

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its latest checkpoints/step_*, EMA weights preferred")
    source.add_argument("--checkpoint", metavar="DIR", help="one step directory (or a .safetensors file)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--per-category", type=int, default=32, help="prompts per category")
    parser.add_argument("--style", default="dense", choices=STYLES, help="caption style of the prompts: the one "
                        "the model was trained on")
    parser.add_argument("--size", type=int, default=32, help="side of the square samples, pixels")
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: the checkpoint's own, "
                        f"e.g. a distilled student's 4; else {DEFAULT_STEPS})")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = off (default: "
                        f"the checkpoint's own, e.g. 1 for a distilled student; else {DEFAULT_CFG})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first sample (item k: seed + k); "
                        "the prompt set itself is fixed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--no-ema", action="store_true", help="load model.safetensors even where EMA exists")


def check_args(args: argparse.Namespace) -> None:
    for name in ("per_category", "steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.cfg is not None and args.cfg < 0:
        raise ValueError("--cfg must be ≥ 0")


def run(args: argparse.Namespace) -> int:
    import torch

    from inference.checkpoint import describe_denoiser, latest_step_dir, sampling_settings
    from inference.generate import Pipeline, make_grid, validate_size
    from scenes.adherence import CATEGORIES, evaluate, prompt_set

    check_args(args)
    size, _ = validate_size(args.size, args.size)
    # a run's latest step or a checkpoint, full or LoRA (its base with the adapter merged), in fp32
    source = describe_denoiser(latest_step_dir(args.run) if args.run else args.checkpoint, prefer_ema=not args.no_ema)
    args.steps, args.cfg = sampling_settings(source.spec, args.steps, args.cfg, DEFAULT_STEPS, DEFAULT_CFG)
    weights = source.adapters[0][0] if source.adapters else source.files[0]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    autocast = torch.bfloat16 if device.startswith("cuda") else None
    pipe = Pipeline.from_source(source, device=device, dtype=torch.float32, autocast=autocast)
    items = prompt_set(per_category=args.per_category, style=args.style)

    images = []

    def generate(prompts: list[str], seeds: list[int]) -> list:
        batch = pipe.generate(prompts, size, size, steps=args.steps, cfg=args.cfg, seeds=seeds,
                              batch_size=args.batch_size)
        images.extend(batch)  # kept for the sample grids
        return batch

    start = time.perf_counter()
    result = evaluate(generate, items, size=size, seed=args.seed)
    seconds = round(time.perf_counter() - start, 2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for category in CATEGORIES:
        make_grid([im for im, it in zip(images, items) if it.category == category]).save(
            out / f"samples_{category}.png")
    settings = {"checkpoint": str(weights), "spec": source.spec.model_dump(), "per_category": args.per_category,
                "style": args.style, "size": size, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
                "device": device, "seconds": seconds}
    (out / "adherence.json").write_text(json.dumps({"settings": settings, **result.to_dict()}, indent=2) + "\n")
    table = result.to_markdown()
    (out / "adherence.md").write_text(
        f"# Prompt adherence of `{weights}`\n\n{args.per_category} {args.style} prompts per category, {size}², "
        f"{args.steps} steps, CFG {args.cfg}, seed {args.seed}.\n\n{table}\n")
    print(f"{table}\n\n{len(items)} samples in {seconds} s → {out}")
    return 0
