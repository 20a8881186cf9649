"""`lensforge train --data DATA --out RUN [--preset tiny|small|lens-3.8b] [--config F] [--set train.K=V]
[--max-steps N] [--checkpoint-every N] [--log-every N] [--init-from PATH] [--resume]`

Fine-tuning: `--init-from` a Lens release root, its transformer/ folder, a single file or a lensforge run starts
at step 0 from those weights (configs/lens-finetune.yaml); with `train.lora` only adapters train
(configs/lens-lora.yaml).

Several processes or nodes: `torchrun --nproc-per-node K -m pipelines.cli train ...` (DDP by default,
`--set train.parallel.strategy=fsdp` for FSDP2). Writes RUN/config.json, RUN/metrics.jsonl,
RUN/checkpoints/step_XXXXXXXX/ (which `lensforge generate --run RUN` reads) and RUN/samples/.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipelines.config import add_config_args, load_section

NAME = "train"
HELP = "train the Lens MMDiT on precomputed shards (rectified flow; DDP or FSDP2 under torchrun; resumable)"
STORAGE_ARGS = ("data", "out")  # may be s3:// URLs: the command works on a synced local copy (common/storage.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from inference.config import list_models

    parser.add_argument("--data", required=True, metavar="DATA", help="data directory (DATA/shards/<set_id>) or "
                        "one shard set directory")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory (created)")
    parser.add_argument("--preset", choices=list_models(), default=None, help="model preset (default: the "
                        "config's, tiny)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--init-from", metavar="PATH", default=None, help="fine-tune: start from these weights (a "
                        "Lens release, transformer/ folder, single file, lensforge run); sets train.init_from")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_config_args(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_section("train", args.config, args.overrides, reads=("train",), preset=args.preset,
                       max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                       init_from=args.init_from)
    from training.trainer import train

    return locked(args.out, NAME, lambda: train(cfg, args.data, args.out, resume=args.resume),
                  lambda step, checkpoint: f"train: step {step}, checkpoint {checkpoint}")


def locked(out: str, name: str, work: Callable[[], dict], report: Callable[[int, str], str]) -> int:
    """The exit code of `work()` run with RUN's lock held by rank 0 (torchrun's other ranks share the run with
    it): 0, printing `report(step, checkpoint)` when a checkpoint was written, or 3 when training stopped (its
    one-line reason printed)."""
    import contextlib
    import os

    from common.data_lock import data_lock
    from training.trainer import TrainingStopped

    lock = data_lock(out, name) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
    try:
        with lock:
            result = work()
    except TrainingStopped as err:
        print(f"lensforge: {err}", file=sys.stderr)
        return 3
    if result.get("checkpoint"):
        print(report(result["step"], result["checkpoint"]))
    return 0


if __name__ == "__main__":  # `python -m pipelines.commands.train ...` works before `train` is in pipelines/cli.py
    from pipelines import cli

    if NAME not in cli.COMMAND_MODULES:
        cli.COMMAND_MODULES.append(NAME)
    sys.exit(cli.main([NAME, *sys.argv[1:]]))
