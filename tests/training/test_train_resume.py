"""Kill `lensforge train` with SIGKILL mid-run, rerun it with --resume, and get exactly the uninterrupted run's
losses (CPU, deterministic mode): weights, AdamW state, EMA, data position and RNG all come back. The same for a
LoRA fine-tune (adapters with dropout over a frozen base from `--init-from`)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from inference.checkpoint import describe_denoiser
from inference.weights_io import read_header

STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", {(32, 32): 48, (48, 48): 24},
                               variants=("dense", "short"), shard_size=12)


def command(data, run, *extra):
    return [sys.executable, "-m", "pipelines.commands.train", "--data", str(data), "--out", str(run),
            "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--log-every", "1",
            "--set", "train.deterministic=true", "--set", "train.progress=false",
            "--set", "train.data.batch_sizes={32: 4, 48: 2}", "--set", "train.data.captions={dense: 0.5, short: 0.5}",
            *extra]


def losses(run) -> dict[int, float]:
    """step → loss of the last record of that step (a resumed run logs the replayed steps again)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            out[record["step"]] = record["loss"]
    return out


def logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line),
               default=0) if path.is_file() else 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny lensforge checkpoint for the LoRA run to start from."""
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset

    return save_random_checkpoint(tmp_path_factory.mktemp("base") / "step_00000000",
                                  CheckpointSpec(model=get_preset("tiny")))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(data, base, tmp_path, kind):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = ["--init-from", str(base), "--set", "train.lora={rank: 4, alpha: 8, dropout: 0.1}",
             "--set", "train.optim.lr=1e-2"] if kind == "lora" else []
    done = subprocess.run(command(data, whole, *extra), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(command(data, killed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while logged_steps(killed) < 2 * EVERY + 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reached = logged_steps(killed)
    assert 2 * EVERY + 2 <= reached < STEPS, "the run was not killed mid-way"

    done = subprocess.run(command(data, killed, *extra, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resume = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()
              if '"resume"' in line]
    assert len(resume) == 1 and resume[0]["step"] % EVERY == 0 and resume[0]["step"] < reached
    assert losses(killed) == losses(whole)  # exactly equal, every step, the replayed ones included
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    last = killed / "checkpoints" / f"step_{STEPS:08d}"
    assert describe_denoiser(killed).kind == ("lora" if kind == "lora" else "lensforge")
    for name in ("adapter.safetensors", "adapter_ema.safetensors") if kind == "lora" else ("model.safetensors",):
        # tensors and metadata (safetensors orders the metadata entries of its header arbitrarily)
        mine, theirs = last / name, whole / "checkpoints" / last.name / name
        assert read_header(mine)[1] == read_header(theirs)[1]
        a, b = load_file(str(mine)), load_file(str(theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
