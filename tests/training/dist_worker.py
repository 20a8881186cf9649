"""Run by test_parallel.py under `torchrun --nproc-per-node 2`: train a few steps through the Trainer, then write
this rank's full weights (FSDP shards gathered) and the buckets it trained on, for the test to compare.

    torchrun --nproc-per-node 2 tests/training/dist_worker.py DATA OUT fsdp 4 [--resume] [--ac]
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


def main(data: str, out: str, strategy: str, steps: str, *flags: str) -> None:
    cfg = TrainConfig(
        data={"batch_sizes": {32: 4, 48: 2}, "shuffle_buffer": 4}, max_steps=int(steps), checkpoint_every=2,
        log_every=1, progress=False, deterministic=True,
        parallel={"strategy": strategy, "activation_checkpointing": "--ac" in flags},
    )
    trainer = Trainer(cfg, data, out, resume="--resume" in flags)
    buckets = []
    original = trainer.train_step

    def train_step(batch, step):
        buckets.append(batch.bucket)
        return original(batch, step)

    trainer.train_step = train_step
    trainer.fit()
    full = {plain_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in trainer.model.named_parameters()}
    rank = trainer.d.rank
    save_file(full, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"buckets": buckets, "world": trainer.d.world}))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
