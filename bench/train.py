"""The trainer's data path and parallel step on this machine's CPU, at the `small` preset (64² → 256 tokens).

    .venv/bin/python -m bench.train                  # ≈ 3 minutes on 2 cores
    .venv/bin/python -m bench.train --steps 8 --batch 4

1. Loader samples/s (shards → decoded, collated micro-batches, inline) versus the trainer's consumption in
   samples/s. Goal: ≥ 5×.
2. The data-wait fraction during training (time the step waits for its batch / step time). Goal: ≤ 5 %.
3. Step time of DDP with two CPU processes (gloo, one thread each, the same per-rank batch) versus one process
   (two threads), and the samples/s of each.
Shards: rendered scenes at 64² with dense captions (MiniLM features), written once under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from training.loader import Loader, open_shard_set
from training.train_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.report, also for `python bench/train.py`
from bench.report import emit, row  # noqa: E402


def make_shards(work: Path, samples: int) -> Path:
    """Rendered 64² scenes → shards in the precompute format (the test suite's writer, reused)."""
    data = work / "data"
    if not (data / "shards").is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from scenes.shards import write_scene_shards

        write_scene_shards(data, {(64, 64): samples}, shard_size=256)
    return data


def loader_rate(data: Path, batch: int, batches: int) -> float:
    cfg = TrainConfig(preset="small", data={"batch_size": batch})
    loader = Loader(open_shard_set(data, cfg), cfg)
    loader.next_batch()  # open the first shard
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches * batch / (time.perf_counter() - start)


def train_run(data: Path, run: Path, batch: int, steps: int, procs: int) -> dict:
    """`lensforge train` (or torchrun with `procs` processes) for `steps` steps; the last `train` record, which
    averages the steps after the first `steps // 2` (warm-up excluded). A previous run in `run` is removed."""
    shutil.rmtree(run, ignore_errors=True)
    args = ["-m", "pipelines.commands.train", "--data", str(data), "--out", str(run), "--preset", "small",
            "--max-steps", str(steps), "--log-every", str(steps // 2), "--checkpoint-every", str(10 * steps),
            "--set", f"train.data.batch_size={batch}", "--set", "train.progress=false"]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(procs), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"][-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-out/train", help="shards and runs go here (kept between runs)")
    parser.add_argument("--samples", type=int, default=512, help="64² scenes in the shard set")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per process")
    parser.add_argument("--steps", type=int, default=8, help="steps per training run (the second half is timed)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    data = make_shards(work, args.samples)
    loader = loader_rate(data, args.batch, batches=max(1, args.samples // args.batch - 1))
    one = train_run(data, work / "run-1proc", args.batch, args.steps, procs=1)
    two = train_run(data, work / "run-2proc", args.batch, args.steps, procs=2)
    print(f"small preset, 64² (256 image tokens), micro-batch {args.batch}, {os.cpu_count()} CPU cores")
    print(f"{'loader, samples/s':<44}{loader:>12.1f}")
    print(f"{'trainer consumes, samples/s (1 process)':<44}{one['samples_per_s']:>12.2f}")
    ratio = loader / one["samples_per_s"]
    print(f"{'loader / trainer':<44}{ratio:>11.0f}×   goal ≥ 5×: {'ok' if ratio >= 5 else 'MISSED'}")
    print(f"{'data-wait fraction during training':<44}{one['data_wait']:>12.2%}   goal ≤ 5 %: "
          f"{'ok' if one['data_wait'] <= 0.05 else 'MISSED'}")
    print(f"{'step time, 1 process (s)':<44}{one['step_s']:>12.2f}")
    print(f"{'step time, DDP 2 processes (s)':<44}{two['step_s']:>12.2f}   ({two['step_s'] / one['step_s']:.2f}× "
          f"the 1-process step, for 2× the samples)")
    rates = f"{one['samples_per_s']:>12.2f} → {two['samples_per_s']:.2f}"
    print(f"{'samples/s, 1 process → DDP 2 processes':<44}{rates}")
    emit([row("train", f"loader vs trainer, `small` preset at 64², micro-batch {args.batch}", loader, "samples/s",
              peer=one["samples_per_s"], peer_name="trainer consumes (1 process)", goal=">= 5"),
          row("train", "data-wait fraction during training", 100 * one["data_wait"], "%", goal="<= 5",
              goal_of="value"),
          row("train", "step time, DDP 2 processes (2× the samples)", two["step_s"], "s", peer=one["step_s"],
              peer_name="1 process"),
          row("train", "samples/s, DDP 2 processes", two["samples_per_s"], "samples/s", peer=one["samples_per_s"],
              peer_name="1 process")])


if __name__ == "__main__":
    main()
