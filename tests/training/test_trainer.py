"""The trainer in one process: the run directory (config, metrics, atomic keep-last-K checkpoints that `generate`
reads, validation, sample grid), non-finite steps skipped and then stopping with the last checkpoint intact, the
cache-key refusal, and the FLOP count against torch's own counter."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from inference.checkpoint import resolve_checkpoint
from inference.config import get_preset
from inference.generate import Pipeline
from inference.mmdit import MMDiT
from training.loader import open_shard_set
from training.metrics import forward_flops
from training.train_config import TrainConfig
from training.trainer import Trainer, TrainingStopped, lr_at


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", {(32, 32): 48, (48, 48): 24},
                               variants=("dense", "short"), shard_size=12)


def config(**overrides) -> TrainConfig:
    base = {"data": {"batch_size": 4, "shuffle_buffer": 4}, "max_steps": 4, "checkpoint_every": 2,
            "log_every": 1, "progress": False, "deterministic": True}
    return TrainConfig.model_validate({**base, **overrides})


def records(run, kind):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def poison(trainer: Trainer, steps: set[int], snapshots: dict | None = None) -> None:
    """Make the model's output NaN at the given steps (and keep the weights around those steps)."""
    original = trainer.train_step

    def train_step(batch, step):
        hook = trainer.model.register_forward_hook(lambda m, i, out: out * float("nan")) if step in steps else None
        if snapshots is not None:
            snapshots[step - 1] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        try:
            return original(batch, step)
        finally:
            if hook:
                hook.remove()

    trainer.train_step = train_step


def test_a_run_writes_config_metrics_val_samples_and_checkpoints_generate_reads(data, tmp_path):
    run = tmp_path / "run"
    cfg = config(keep_checkpoints=1, peak_tflops=1.0, data={"batch_size": 4, "holdout": 0.2},
                 val={"every": 2, "samples": 8, "timesteps": [0.25, 0.75]},
                 sample={"every": 4, "prompts": ["A large red circle in the center."], "steps": 2})
    result = Trainer(cfg, data, run).fit()
    assert result["step"] == 4
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["model"]["name"] == "tiny"
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_wait", "tflops", "mfu", "mem_gb"):
        assert all(isinstance(r[key], float) for r in train), key
    val = records(run, "val")
    assert [r["step"] for r in val] == [2, 4] and set(val[0]["val_loss_t"]) == {"0.25", "0.75"}
    assert (run / "samples" / "step_00000004.png").is_file()
    # keep-last-1: only the final step directory, complete; nothing temporary left.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    step = run / "checkpoints" / "step_00000004"
    assert {"model.safetensors", "ema.safetensors", "trainer_state.json", "optimizer"} <= {p.name for p in
                                                                                         step.iterdir()}
    weights, spec = resolve_checkpoint(run=run)
    assert weights.name == "ema.safetensors" and spec.model.name == "tiny"
    image = Pipeline.load(weights, spec).generate(["a red circle"], 32, 32, steps=2, cfg=2.0)[0]
    assert image.size == (32, 32)


def test_a_non_finite_step_is_skipped_logged_and_leaves_the_weights(data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(config(max_steps=5), data, run)
    snapshots = {}
    poison(trainer, {3}, snapshots)
    trainer.fit()
    skips = records(run, "skip")
    assert [s["step"] for s in skips] == [3]
    assert [r["skipped"] for r in records(run, "train")] == [0, 0, 1, 0, 0]
    before, after = snapshots[2], snapshots[3]  # weights entering step 3 and entering step 4
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not all(torch.equal(snapshots[3][n], snapshots[4][n]) for n in before)  # step 4 trained again
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_repeated_non_finite_steps_stop_training_with_the_last_checkpoint_intact(data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(config(max_steps=20, max_bad_steps=3, keep_checkpoints=5), data, run)
    poison(trainer, set(range(3, 21)))
    with pytest.raises(TrainingStopped, match=r"3 non-finite .*steps 3–5.*step_00000004, is intact"):
        trainer.fit()
    assert records(run, "stop")[0]["step"] == 5
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]
    two, four = (load_file(str(run / "checkpoints" / n / "model.safetensors")) for n in names)
    assert all(torch.equal(two[k], four[k]) for k in two)  # the skipped steps 3 and 4 changed nothing
    weights, spec = resolve_checkpoint(run=run)
    assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values())


def run_cli(argv):
    from pipelines.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_shards_from_other_encoders_are_refused_saying_what_differs(tmp_path):
    from scenes.shards import write_scene_shards

    write_scene_shards(tmp_path / "data", {(32, 32): 4}, encoders_patch={"codec": {"codec": "pixel:8"}})
    with pytest.raises(ValueError, match=r"codec\.codec: 'pixel:8' in the shards, 'pixel' expected"):
        run_cli(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_encoder_width_and_missing_caption_variants_are_refused_too(data):
    with pytest.raises(ValueError, match=r"2 layers × 384 = 768 wide, model 'tiny' wants 1 × 384"):
        open_shard_set(data, TrainConfig(model={"text_layers": 1, "rope_axes": [4, 14, 14]}))
    with pytest.raises(ValueError, match=r"caption variants \['alt'\] not in the shards"):
        open_shard_set(data, TrainConfig(data={"captions": {"dense": 0.5, "alt": 0.5}}))
    fingerprint = {"text": {"weights": "0" * 64}}
    with pytest.raises(ValueError, match=r"text\.weights: '[0-9a-f]{64}' in the shards, '0{64}' expected"):
        open_shard_set(data, TrainConfig(encoders=fingerprint))


def test_a_run_with_checkpoints_needs_resume(data, tmp_path):
    run = tmp_path / "run"
    Trainer(config(max_steps=2), data, run).fit()
    with pytest.raises(ValueError, match="already has checkpoints .* pass --resume"):
        Trainer(config(max_steps=2), data, run)


def test_warmup_then_constant_lr():
    cfg = TrainConfig(optim={"lr": 1e-3, "warmup_steps": 100})
    assert [lr_at(cfg, s) for s in (1, 50, 100, 5000)] == pytest.approx([1e-5, 5e-4, 1e-3, 1e-3])


def test_flop_count_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("tiny")
    model = MMDiT(cfg)
    x, text = torch.randn(2, 48, 8, 8), torch.randn(2, 13, 768)
    # The math backend: the counter sees attention's matmuls (it does not count CPU's fused SDPA kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.rand(2), text, torch.ones(2, 13, dtype=torch.bool))
    assert forward_flops(cfg, 64, 13) * 2 == pytest.approx(counter.get_total_flops(), rel=0.01)
