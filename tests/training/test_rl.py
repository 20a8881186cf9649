"""`lensforge rl` end to end on a tiny model (training/rl.py): DiffusionNFT with the scenes rule reward and with the
rubric judge at the local OpenAI-compatible endpoint (real HTTP), full and LoRA; the run is an ordinary checkpoint
that generate reads with the rollouts' steps and CFG; a SIGKILLed run resumes to the uninterrupted run's losses
(the sampling policy θ_old included); the judge is billed, journaled and capped; bad input is one line."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from captioning.endpoint import start_endpoint
from tests.training.test_distill import cli, killed_after, records
from training.rl_config import RLConfig

STEPS, EVERY = 6, 2
KEY = "sk-rl-e2e"
FLAGS = ["--set", "rl.progress=false", "--set", "rl.deterministic=true", "--set", "rl.rollout.prompts=3",
         "--set", "rl.rollout.images=4", "--set", "rl.rollout.steps=3", "--set", "rl.train_batch=6",
         "--set", "rl.optim.lr=1e-3", "--set", "rl.old.ramp=0.1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny lensforge checkpoint (x-prediction, as the demo's model)."""
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset

    model = get_preset("tiny").model_copy(update={"prediction": "x"})
    return save_random_checkpoint(tmp_path_factory.mktemp("init") / "step_00000000", CheckpointSpec(model=model),
                                  std=0.2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    done = subprocess.run(cli("scenes", "prompts", "--out", path, "--categories", "colors,single_object",
                              "--per-category", 4), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return path


@pytest.fixture(scope="module")
def endpoint():
    handle, base_url = start_endpoint(api_key=KEY, seed=0)
    yield base_url
    handle.stop()


def rl_cmd(init, prompts, run, *extra) -> list[str]:
    return cli("rl", "--init", init, "--prompts", prompts, "--out", run, "--max-steps", STEPS,
               "--checkpoint-every", EVERY, "--log-every", 1, *FLAGS, *extra)


def losses(run) -> dict[int, tuple]:
    keys = ("loss", "grad_norm", "nft", "kl", "reward", "reward_std", "flat", "z")
    return {r["step"]: tuple(r[k] for k in keys) for r in records(run)}


def judge_env() -> dict:
    return {**os.environ, "OPENAI_API_KEY": KEY}


@pytest.fixture(scope="module")
def scenes_run(teacher, prompts, tmp_path_factory):
    run = tmp_path_factory.mktemp("rl") / "scenes"
    done = subprocess.run(rl_cmd(teacher, prompts, run, "--reward", "scenes"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def judge_run(teacher, prompts, endpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("rl") / "judge"
    done = subprocess.run(rl_cmd(teacher, prompts, run, "--reward", "judge", "--base-url", endpoint),
                          capture_output=True, text=True, timeout=300, env=judge_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def journal(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rl" / "judge-rank0.jsonl").read_text().splitlines()]


def test_flat_rewards_teach_nothing_and_the_run_samples_as_it_was_trained(scenes_run, teacher, tmp_path):
    """A random model's rollouts of one prompt all pass the rule or all fail it (its colour prompts pass, its shape
    prompts fail): every r is ½, so the NFT gradient is zero, the KL to the reference (itself) too, and the policy
    stays exactly where it started."""
    train = records(scenes_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert any(r["reward"] > 0 for r in train) and any(r["reward"] < 1 for r in train)  # rewards, but no spread
    assert all(r["flat"] == 1 and r["kl"] == 0 and r["grad_norm"] == 0 for r in train)
    last = scenes_run / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((last / "model_config.json").read_text())["sampling"] == {"steps": 3, "cfg": 1.0}
    policy, start = load_file(str(last / "model.safetensors")), load_file(str(teacher / "model.safetensors"))
    assert policy.keys() == start.keys() and all(torch.equal(policy[k], start[k]) for k in start)

    out = tmp_path / "gen"
    done = subprocess.run(cli("generate", "a red circle", "--run", scenes_run, "--out", out, "--size", "32x32"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads((out / "generate.json").read_text())
    assert (settings["steps"], settings["cfg"]) == (3, 1.0)  # the rollouts' sampler: what was optimised


def test_the_judge_reward_is_graded_billed_and_moves_the_policy(judge_run, teacher):
    train = records(judge_run)
    for r in train:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "nft", "kl", "reward", "z"))
        assert 0 <= r["reward"] <= 1 and 0 <= r["flat"] <= 1 and r["judge_usd"] > 0 and r["judge_requests"] > 0
    assert any(0 < r["reward"] < 1 for r in train) and any(r["flat"] < 1 for r in train)  # the share of yes
    assert train[0]["kl"] == 0 and train[-1]["kl"] > 0  # the reference is the initial model
    totals = [r["judge_usd_total"] for r in train]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(sum(r["judge_usd"] for r in train))
    assert sum(r["usd"] for r in journal(judge_run)) == pytest.approx(totals[-1])  # the journal is the ledger
    last = judge_run / "checkpoints" / f"step_{STEPS:08d}"
    policy, start = load_file(str(last / "model.safetensors")), load_file(str(teacher / "model.safetensors"))
    old = load_file(str(last / "rl" / "old.safetensors"))
    moved = [k for k in start if not torch.equal(policy[k], start[k])]
    assert moved and all(not torch.equal(old[k], policy[k]) and not torch.equal(old[k], start[k])
                         for k in moved[:5])  # θ_old lags θ: an average, neither end


def test_sigkill_then_resume_gives_the_uninterrupted_losses_and_pays_nothing_twice(judge_run, teacher, prompts,
                                                                                   endpoint, tmp_path):
    killed = tmp_path / "killed"
    cmd = rl_cmd(teacher, prompts, killed, "--reward", "judge", "--base-url", endpoint)
    reached = killed_after(cmd, killed, EVERY + 1, env=judge_env())
    assert EVERY + 1 <= reached < STEPS, "the run was not killed mid-way"
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=judge_env())
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = records(killed, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] % EVERY == 0 and resumed[0]["step"] < reached
    assert losses(killed) == losses(judge_run)  # every figure, every step, exactly
    # the replayed steps' answers came from the journal: as many requests paid as in the uninterrupted run
    assert len(journal(killed)) == len(journal(judge_run))
    last = f"checkpoints/step_{STEPS:08d}"
    for name in ("model.safetensors", "rl/old.safetensors"):
        a, b = load_file(str(killed / last / name)), load_file(str(judge_run / last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_judge_with_lora_trains_adapters_only_and_stops_at_its_budget(teacher, prompts, endpoint, tmp_path):
    run = tmp_path / "lora"
    lora = ["--set", "rl.lora.rank=4", "--set", "rl.lora.alpha=8"]
    done = subprocess.run(rl_cmd(teacher, prompts, run, "--reward", "judge", "--base-url", endpoint, *lora),
                          capture_output=True, text=True, timeout=300, env=judge_env())
    assert done.returncode == 0, done.stderr[-3000:]
    train = records(run)
    assert train[0]["kl"] == 0 and train[-1]["kl"] > 0  # B starts at zero: the reference is the adapters off
    last = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (last / "adapter.safetensors").is_file() and not (last / "model.safetensors").exists()
    totals = [r["judge_usd_total"] for r in train]

    capped = tmp_path / "capped"
    budget = totals[1] * 1.5  # enough for the first steps (their cost is the uninterrupted run's), not all six
    done = subprocess.run(rl_cmd(teacher, prompts, capped, "--reward", "judge", "--base-url", endpoint, *lora,
                                 "--max-cost-usd", budget), capture_output=True, text=True, timeout=300,
                          env=judge_env())
    assert done.returncode == 3, done.stderr[-3000:]
    assert "budget is spent" in done.stderr and "Traceback" not in done.stderr
    assert sum(r["usd"] for r in journal(capped)) <= budget
    assert (capped / "checkpoints" / f"step_{EVERY:08d}").is_dir()  # what was trained before it stopped is kept


def test_bad_input_is_one_line(teacher, prompts, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("a red circle\n")
    for args, message in [(("--prompts", text, "--reward", "scenes"), "needs every prompt's category"),
                          (("--reward", "scenes"), "rl.prompts"),
                          (("--prompts", tmp_path / "missing.jsonl"), "prompt file not found")]:
        done = subprocess.run(cli("rl", "--init", teacher, "--out", tmp_path / "bad", *args), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(ValueError, match="no held-out loss"):
        RLConfig(init=str(teacher), val={"every": 5})
    with pytest.raises(ValueError, match="differs from rl.init"):
        RLConfig(init=str(teacher), init_from="/elsewhere")
    assert RLConfig(init=str(teacher)).init_from == str(teacher)


@pytest.mark.slow  # ≈ 40 s: two torchrun launches (tests/training/test_parallel.py covers the trainer's on every push)
def test_ddp_and_fsdp_under_torchrun_post_train_the_same_policy(teacher, prompts, endpoint, tmp_path):
    """Two CPU processes (gloo), each rank its own prompts and judge journal: the policy and θ_old come out the same
    sharded (FSDP2: θ_old worn on each rank's shards, the reference sharded too) as replicated (DDP)."""
    from tests.training.test_parallel import TORCHRUN, run_group

    out = {}
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pipelines.cli", "rl", "--init",
               str(teacher), "--prompts", str(prompts), "--out", str(run), "--reward", "judge", "--base-url",
               endpoint, "--max-steps", "2", "--checkpoint-every", "2", "--log-every", "1", *FLAGS,
               "--set", f"rl.parallel.strategy={strategy}"]
        done = run_group(cmd, timeout=300, env=judge_env())
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert (run / "rl" / "judge-rank1.jsonl").is_file()
        out[strategy] = run / "checkpoints" / "step_00000002"
    for name in ("model.safetensors", "ema.safetensors", "rl/old.safetensors"):
        a, b = load_file(str(out["ddp"] / name)), load_file(str(out["fsdp"] / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
