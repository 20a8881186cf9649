"""Run by test_parallel.py under `torchrun --nproc-per-node 2`: train a few steps through the Trainer, then write
this rank's full weights (FSDP shards gathered) and the buckets it trained on, for the test to compare.

    torchrun --nproc-per-node 2 tests/training/dist_worker.py DATA OUT fsdp 4 [--resume] [--ac] [--init-from=PATH]
        [--lora]

With --init-from it also writes this rank's full weights as built, before any step (`rank{R}-start.safetensors`).
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from training.ema import plain_name
from training.parallel import close_distributed
from training.train_config import TrainConfig
from training.trainer import Trainer


def full_weights(model) -> dict:
    return {plain_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in model.named_parameters()}


def main(data: str, out: str, strategy: str, steps: str, *flags: str) -> None:
    init_from = next((f.partition("=")[2] for f in flags if f.startswith("--init-from=")), None)
    cfg = TrainConfig(
        data={"batch_sizes": {32: 4, 48: 2}, "shuffle_buffer": 4}, max_steps=int(steps), checkpoint_every=2,
        log_every=1, progress=False, deterministic=True,
        parallel={"strategy": strategy, "activation_checkpointing": "--ac" in flags},
        init_from=init_from, lora={"rank": 4, "alpha": 8} if "--lora" in flags else None,
        optim={"lr": 1e-2} if "--lora" in flags else {},
    )
    trainer = Trainer(cfg, data, out, resume="--resume" in flags)
    if init_from:
        save_file(full_weights(trainer.model), str(Path(out) / f"rank{trainer.d.rank}-start.safetensors"))
    buckets = []
    original = trainer.train_step

    def train_step(batch, step):
        buckets.append(batch.bucket)
        return original(batch, step)

    trainer.train_step = train_step
    trainer.fit()
    full = full_weights(trainer.model)
    rank = trainer.d.rank
    save_file(full, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"buckets": buckets, "world": trainer.d.world}))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
