"""`lensforge distill` end to end on a tiny teacher (training/distill.py): the student is an ordinary checkpoint
that generate / evaluate / export read with its own 4-step, no-CFG defaults; a SIGKILLed run resumes to the
uninterrupted run's losses (fake score, its EMA, the discriminator and all three optimizers included); each loss
term can be switched off, and then costs nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from training.distill_config import DistillConfig

STEPS, EVERY = 8, 3
BASE_FLAGS = ["--set", "distill.progress=false", "--set", "distill.deterministic=true",
              "--set", "distill.data.batch_size=4", "--set", "distill.fake.updates=2",
              "--set", "distill.optim.lr=1e-3", "--set", "distill.fake.lr=1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "distill", {(32, 32): 32}, shard_size=8)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny lensforge checkpoint (x-prediction, as the demo's teacher)."""
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset

    model = get_preset("tiny").model_copy(update={"prediction": "x"})
    return save_random_checkpoint(tmp_path_factory.mktemp("teacher") / "step_00000000", CheckpointSpec(model=model))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *map(str, args)]


def distill_cmd(teacher, data, run, *extra) -> list[str]:
    return cli("distill", "--teacher", teacher, "--data", data, "--out", run, "--max-steps", STEPS,
               "--checkpoint-every", EVERY, "--log-every", 1, *BASE_FLAGS, *extra)


def records(run, kind="train") -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses(run) -> dict[int, tuple]:
    """step → every logged term of its last record (a resumed run logs the replayed steps again)."""
    keys = ("loss", "grad_norm", "dm", "ca", "gan", "fake", "disc", "r1", "fake_grad_norm")
    return {r["step"]: tuple(r[k] for k in keys) for r in records(run)}


def killed_after(cmd: list[str], run, steps: int, env: dict | None = None) -> int:
    """Start a training command and SIGKILL its process group once `run` has logged `steps` train records; the
    records it reached (a checkpoint was due on the way)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    deadline = time.monotonic() + 240
    try:
        while len(records(run)) < steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(records(run))


@pytest.fixture(scope="module")
def whole(teacher, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "whole"
    done = subprocess.run(distill_cmd(teacher, data, run), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_distill_writes_a_student_that_generate_evaluate_and_export_use_with_its_own_defaults(whole, teacher,
                                                                                              tmp_path):
    train = records(whole)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:  # every term logged, finite, and the two critics really train
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "dm", "ca", "gan", "fake", "disc", "r1"))
        assert r["gan"] > 0 and r["fake"] > 0 and 0 < r["d_real"] < 1
    last = whole / "checkpoints" / f"step_{STEPS:08d}"
    spec = json.loads((last / "model_config.json").read_text())
    assert spec["sampling"] == {"steps": 4, "cfg": 1.0}
    for name in ("fake.safetensors", "fake_ema.safetensors", "disc.safetensors"):
        assert (last / "distill" / name).is_file()
    student, start = load_file(str(last / "model.safetensors")), load_file(str(teacher / "model.safetensors"))
    assert any(not torch.equal(student[k], start[k]) for k in start)  # the student moved off the teacher
    fake, fake_ema = load_file(str(last / "distill/fake.safetensors")), \
        load_file(str(last / "distill/fake_ema.safetensors"))
    moved = [k for k in start if not torch.equal(fake[k], start[k])]
    assert moved and all(not torch.equal(fake_ema[k], fake[k]) for k in moved[:5])  # an average, not a copy

    out = tmp_path / "gen"
    done = subprocess.run(cli("generate", "a red circle", "--run", whole, "--out", out, "--size", "32x32"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads((out / "generate.json").read_text())
    assert (settings["steps"], settings["cfg"]) == (4, 1.0)  # the student's own defaults
    done = subprocess.run(cli("generate", "a red circle", "--run", whole, "--out", out, "--size", "32x32",
                              "--steps", 2, "--cfg", 3), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads((out / "generate.json").read_text())["steps"] == 2  # flags win

    ev = tmp_path / "eval"
    done = subprocess.run(cli("evaluate", "--run", whole, "--out", ev, "--per-category", 1),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((ev / "adherence.json").read_text())["settings"]["steps"] == 4

    done = subprocess.run(cli("export", whole, "--out", tmp_path / "export"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from inference.checkpoint import load_denoiser

    exported = load_denoiser(tmp_path / "export" / "transformer").state_dict()
    ema = load_file(str(last / "ema.safetensors"))  # export takes the EMA weights, as generate does
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)


def test_sigkill_then_resume_gives_the_uninterrupted_losses(whole, teacher, data, tmp_path):
    killed = tmp_path / "killed"
    reached = killed_after(distill_cmd(teacher, data, killed), killed, EVERY + 1)
    assert EVERY + 1 <= reached < STEPS, "the run was not killed mid-way"

    done = subprocess.run(distill_cmd(teacher, data, killed, "--resume"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = records(killed, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] % EVERY == 0 and resumed[0]["step"] < reached
    assert losses(killed) == losses(whole)  # every term, every step, exactly
    last = f"checkpoints/step_{STEPS:08d}"
    for name in ("model.safetensors", "distill/fake.safetensors", "distill/disc.safetensors"):
        a, b = load_file(str(killed / last / name)), load_file(str(whole / last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switching_terms_off_drops_them_and_their_state(teacher, data, tmp_path):
    """"DMD alone" (no CFG term, no GAN, no fake EMA) is one config change: no discriminator is built or saved."""
    from training.distill import distill

    cfg = DistillConfig(teacher=str(teacher), max_steps=2, checkpoint_every=2, log_every=1, progress=False,
                        data={"batch_size": 4}, fake={"updates": 1, "ema": 0.0}, losses={"ca": 0.0, "gan": 0.0})
    distill(cfg, data, tmp_path / "dmd")
    (r1, r2) = records(tmp_path / "dmd")
    assert r1["ca"] == r2["ca"] == 0 and r1["gan"] == 0 and "disc" not in r1 and r1["dm"] > 0
    step = tmp_path / "dmd/checkpoints/step_00000002/distill"
    assert (step / "fake.safetensors").is_file()
    assert not (step / "disc.safetensors").exists() and not (step / "fake_ema.safetensors").exists()
    full = DistillConfig(teacher=str(teacher), max_steps=2, checkpoint_every=2, log_every=1, progress=False,
                         data={"batch_size": 4}, fake={"updates": 1})
    distill(full, data, tmp_path / "full")
    first = records(tmp_path / "full")[0]
    assert first["ca"] != 0 and first["gan"] > 0 and first["disc"] > 0
    with pytest.raises(ValueError, match="other distill settings"):  # no discriminator to resume: said, not guessed
        distill(full.model_copy(update={"max_steps": 3}), data, tmp_path / "dmd", resume=True)


def test_the_config_names_its_mistakes(teacher):
    with pytest.raises(ValueError, match="differs from distill.teacher"):
        DistillConfig(teacher=str(teacher), init_from="/elsewhere")
    with pytest.raises(ValueError, match="every student term is 0"):
        DistillConfig(teacher=str(teacher), losses={"dm": 0, "ca": 0, "gan": 0})
    with pytest.raises(ValueError, match="t_min"):
        DistillConfig(teacher=str(teacher), fake={"t_min": 0.9, "t_max": 0.5})
    cfg = DistillConfig(teacher=str(teacher), student_steps=2)
    assert cfg.init_from == str(teacher) and cfg.sample.steps == 2 and cfg.sample.cfg == 1.0
    assert DistillConfig(teacher=str(teacher), sample={"steps": 8}).sample.steps == 8  # an explicit grid wins
    done = subprocess.run(cli("distill", "--data", "x", "--out", "y"), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "distill.teacher" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # ≈ 40 s: two torchrun launches (tests/training/test_parallel.py covers the trainer's on every push)
def test_ddp_and_fsdp_under_torchrun_distill_the_same_student(teacher, data, tmp_path):
    """Two CPU processes (gloo): the student, the fake score and its EMA come out the same sharded (FSDP2: the
    teacher and the fake EMA sharded too) as replicated (DDP), and the run is an ordinary checkpoint."""
    from tests.training.test_parallel import TORCHRUN, run_group

    out = {}
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pipelines.cli", "distill",
               "--teacher", str(teacher), "--data", str(data), "--out", str(run), "--max-steps", "2",
               "--checkpoint-every", "2", "--log-every", "1", *BASE_FLAGS,
               "--set", f"distill.parallel.strategy={strategy}"]
        done = run_group(cmd, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        out[strategy] = run / "checkpoints" / "step_00000002"
    for name in ("model.safetensors", "ema.safetensors", "distill/fake.safetensors", "distill/fake_ema.safetensors",
                 "distill/disc.safetensors"):
        a, b = load_file(str(out["ddp"] / name)), load_file(str(out["fsdp"] / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    assert len(list((out["fsdp"] / "distill" / "fake_optimizer").glob("*.distcp"))) == 2  # sharded: one per rank
    assert json.loads((out["fsdp"] / "model_config.json").read_text())["sampling"] == {"steps": 4, "cfg": 1.0}
