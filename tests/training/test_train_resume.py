"""Kill `lensforge train` with SIGKILL mid-run, rerun it with --resume, and get exactly the uninterrupted run's
losses (CPU, deterministic mode): weights, AdamW state, EMA, data position and RNG all come back."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from inference.checkpoint import resolve_checkpoint

STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.training.scene_shards import cached_scene_shards

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


def test_sigkill_then_resume_gives_the_uninterrupted_losses(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(command(data, whole), capture_output=True, timeout=300).returncode == 0

    proc = subprocess.Popen(command(data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    done = subprocess.run(command(data, killed, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resume = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()
              if '"resume"' in line]
    assert len(resume) == 1 and resume[0]["step"] % EVERY == 0 and resume[0]["step"] < reached
    assert losses(killed) == losses(whole)  # exactly equal, every step, the replayed ones included
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert resolve_checkpoint(run=killed)[0].parent.name == f"step_{STEPS:08d}"
