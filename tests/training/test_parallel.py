"""Two processes under torchrun (gloo, CPU): DDP and FSDP2 keep the weights identical across ranks while the ranks
train different buckets in the same step, agree with each other, and FSDP2's sharded checkpoint resumes exactly.
About a minute: three torchrun launches."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_group(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def failure_text(done: subprocess.CompletedProcess, limit: int = 6000) -> str:
    """What a failed torchrun said: the first rank's error lines (torchrun prefixes them with `[rankN]:`, and the
    rank that failed first is the cause; the others then fail in their collectives), then the output's tail."""
    lines = (done.stdout + done.stderr).splitlines()
    traced = [i for i, line in enumerate(lines) if "Traceback" in line]
    first = "\n".join(lines[traced[0]:traced[0] + 60]) if traced else ""
    return f"{first[:limit // 2]}\n...\n{chr(10).join(lines)[-limit // 2:]}"


def torchrun(data, out, strategy, steps, *flags):
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(WORKER), str(data), str(out), strategy,
           str(steps), *flags]
    done = run_group(cmd, timeout=240)
    assert done.returncode == 0, failure_text(done)
    weights = [load_file(str(Path(out) / f"rank{r}.safetensors")) for r in (0, 1)]
    buckets = [json.loads((Path(out) / f"rank{r}.json").read_text())["buckets"] for r in (0, 1)]
    return weights, buckets


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", {(32, 32): 48, (48, 48): 24},
                               variants=("dense", "short"), shard_size=12)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # Both with per-block activation checkpointing (test_trainer.py covers the plain model).
    return {"ddp": torchrun(data, root / "ddp", "ddp", 4, "--ac"),
            "fsdp": torchrun(data, root / "fsdp", "fsdp", 4, "--ac"), "root": root}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_weights_stay_identical_across_ranks_that_train_different_buckets(runs, strategy):
    (rank0, rank1), (buckets0, buckets1) = runs[strategy]
    assert same(rank0, rank1)
    assert any(a != b for a, b in zip(buckets0, buckets1))  # different resolutions in the same step
    start = load_file(str(runs["root"] / strategy / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert not same(start, rank0)  # and they did train


def final(runs, strategy: str, name: str) -> dict:
    return load_file(str(runs["root"] / strategy / "checkpoints" / "step_00000004" / name))


def test_ddp_and_fsdp_train_the_same_model_and_ema(runs):
    ddp, fsdp = runs["ddp"][0][0], runs["fsdp"][0][0]
    assert same(final(runs, "fsdp", "model.safetensors"), fsdp)  # the checkpoint gathers the shards
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)
    ema_ddp, ema_fsdp = final(runs, "ddp", "ema.safetensors"), final(runs, "fsdp", "ema.safetensors")
    for name in ema_ddp:
        torch.testing.assert_close(ema_fsdp[name], ema_ddp[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_sharded_checkpoint_resumes_exactly(runs, data):
    source, run = runs["root"] / "fsdp", runs["root"] / "fsdp-resumed"
    shutil.copytree(source / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    assert len(list((run / "checkpoints" / "step_00000002" / "optimizer").glob("*.distcp"))) == 2  # one per rank
    (resumed, _), _ = torchrun(data, run, "fsdp", 4, "--ac", "--resume")
    assert same(resumed, runs["fsdp"][0][0])
    ema = load_file(str(run / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert same(ema, final(runs, "fsdp", "ema.safetensors"))
