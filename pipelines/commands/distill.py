"""`lensforge distill --teacher RUN|CKPT --data DATA --out RUN [--config F] [--set distill.K=V] [--student-steps 4]
[--max-steps N] [--checkpoint-every N] [--log-every N] [--resume]`

Lens-Turbo's recipe (training/distill.py): DMD2 with the decoupled CFG term, a fake score with an EMA, and a
discriminator on the frozen teacher's features; the student starts from the teacher (anything `load_denoiser`
reads, a Lens release included; `distill.lora` for adapters only). Several processes: `torchrun --nproc-per-node
K -m pipelines.cli distill ...` (`--set distill.parallel.strategy=fsdp` for FSDP2). RUN is a training run:
`lensforge generate --run RUN` samples the student with its own defaults (`--steps 4 --cfg 1`).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.config import add_config_args, load_section

NAME = "distill"
HELP = "distill a teacher into a few-step student without CFG (Lens-Turbo: DMD2 + decoupled CFG term + GAN)"
STORAGE_ARGS = ("data", "out")  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", metavar="RUN|CKPT", default=None, help="the teacher: a run, step directory, "
                        "Lens release, transformer/ folder or single file (default: the config's distill.teacher)")
    parser.add_argument("--data", required=True, metavar="DATA", help="data directory (DATA/shards/<set_id>) or "
                        "one shard set directory")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory of the student (created)")
    parser.add_argument("--student-steps", type=int, default=None, help="the student's sampling steps (default 4)")
    parser.add_argument("--max-steps", type=int, default=None, help="student updates (default: the config's)")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_section("distill", args.config, args.overrides, reads=("distill",), teacher=args.teacher,
                       student_steps=args.student_steps, max_steps=args.max_steps,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    from pipelines.commands.train import locked
    from training.distill import distill

    return locked(args.out, NAME, lambda: distill(cfg, args.data, args.out, resume=args.resume),
                  lambda step, checkpoint: f"distill: step {step}, student {checkpoint} "
                                           f"(lensforge generate --run {args.out})")


if __name__ == "__main__":
    from pipelines import cli

    sys.exit(cli.main([NAME, *sys.argv[1:]]))
