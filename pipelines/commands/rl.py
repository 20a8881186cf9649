"""`lensforge rl --init RUN|CKPT --prompts FILE --out RUN --reward scenes|judge [--base-url URL --model MODEL]
[--max-cost-usd X] [--config F] [--set rl.K=V] [--max-steps N] [--checkpoint-every N] [--log-every N] [--resume]`

Lens-RL's post-training (training/rl.py): DiffusionNFT on the model's own rollouts, rewarded by the synthetic
scenes' rule (`scenes`: prompts from `lensforge scenes prompts`) or by a rubric judge at an OpenAI-compatible
endpoint (`judge`: the key from OPENAI_API_KEY, none needed on loopback; billed and capped like captioning). The
init is anything `load_denoiser` reads, a Lens release included (`rl.lora` for adapters only, as Lens-RL). Several
processes: `torchrun --nproc-per-node K -m pipelines.cli rl ...`. RUN is a training run: `lensforge generate --run
RUN` and `lensforge evaluate --run RUN` sample it with the rollouts' steps and CFG.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.config import add_config_args, load_section

NAME = "rl"
HELP = "post-train with RL (Lens-RL: DiffusionNFT; rule reward or a rubric judge at an OpenAI-compatible endpoint)"
STORAGE_ARGS = ("out",)  # may be an s3:// URL: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", metavar="RUN|CKPT", default=None, help="the model to post-train: a run, step "
                        "directory, Lens release, transformer/ folder or file (default: the config's rl.init)")
    parser.add_argument("--prompts", metavar="FILE", default=None, help="one prompt a line, or JSONL with a "
                        "\"prompt\" field (`lensforge scenes prompts` writes one)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory (created)")
    parser.add_argument("--reward", choices=("scenes", "judge"), default=None, help="scenes: the rule reward of "
                        "the synthetic scenes; judge: a vision model answering each prompt's rubric (default scenes)")
    parser.add_argument("--base-url", default=None, help="the judge's OpenAI-compatible base URL, e.g. "
                        "http://127.0.0.1:8001/v1 (sets rl.judge.base_url)")
    parser.add_argument("--model", default=None, help="the judge model (rl.judge.model, default gpt-4.1-mini)")
    parser.add_argument("--max-cost-usd", type=float, default=None, help="stop cleanly before the judge costs "
                        "more than this (rl.judge.max_cost_usd)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    judge = [f"rl.judge.{key}={value}" for key, value in
             (("base_url", args.base_url), ("model", args.model), ("max_cost_usd", args.max_cost_usd))
             if value is not None]  # flags win over --set: applied last
    cfg = load_section("rl", args.config, [*args.overrides, *judge], reads=("rl",), init=args.init,
                       prompts=args.prompts, reward=args.reward, max_steps=args.max_steps,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    from pipelines.commands.train import locked
    from training.rl import rl

    return locked(args.out, NAME, lambda: rl(cfg, args.out, resume=args.resume),
                  lambda step, checkpoint: f"rl: step {step}, checkpoint {checkpoint} "
                                           f"(lensforge generate --run {args.out})")


if __name__ == "__main__":
    from pipelines import cli

    sys.exit(cli.main([NAME, *sys.argv[1:]]))
