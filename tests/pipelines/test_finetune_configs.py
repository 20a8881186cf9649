"""configs/lens-finetune.yaml and configs/lens-lora.yaml say what their comments say: the release, encoded with its
own VAE and GPT-OSS, fine-tuned at Lens's stage-2 settings, fully under FSDP or with Lens-RL's LoRA."""

from pathlib import Path

import pytest

from pipelines.config import load_section
from training.train_config import LORA_TARGETS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RELEASE = "/models/Lens"


def sections(name: str):
    path = str(CONFIGS / name)
    return load_section("precompute", path, []), load_section("train", path, [])


@pytest.mark.parametrize("name", ["lens-finetune.yaml", "lens-lora.yaml"])
def test_both_start_from_the_release_on_data_encoded_with_its_own_encoders(name):
    pre, train = sections(name)
    assert train.init_from == RELEASE
    # What the release root names (inference/checkpoint.py), what precompute wrote: else training refuses the shards.
    assert (pre.codec, pre.text_encoder) == (f"flux2:{RELEASE}/vae", f"gpt-oss:{RELEASE}")
    assert (train.codec, train.text_encoder) == (pre.codec, pre.text_encoder)
    assert pre.buckets.base_sides == [512, 768, 1024] and pre.text_encoder_dtype == "bfloat16"
    # Lens stage 2: mixed-resolution micro-batches, caption dropout, AdamW betas, clipping, bf16.
    assert train.data.batch_sizes == {512: 24, 768: 10, 1024: 6}
    assert sorted(train.data.batch_sizes) == pre.buckets.base_sides  # a batch size for every base area
    assert train.data.caption_dropout == 0.1 and train.precision == "bf16"
    assert (train.optim.betas, train.optim.grad_clip) == ((0.9, 0.999), 1.0)
    assert train.parallel.activation_checkpointing
    # The comments' rule for the EMA: a horizon of at most a fifth of the run (Lens's 0.9999 would outlast it).
    assert round(1 / (1 - train.ema.decay)) <= train.max_steps / 5
    assert train.val.every and train.data.holdout > 0


def test_the_two_build_the_same_shard_set():
    (full_pre, _), (lora_pre, _) = sections("lens-finetune.yaml"), sections("lens-lora.yaml")
    assert full_pre == lora_pre


def test_full_fine_tune_is_fsdp_at_stage_2_lr():
    _, train = sections("lens-finetune.yaml")
    assert train.lora is None and train.parallel.strategy == "fsdp" and train.parallel.reshard_after_forward
    assert train.optim.lr == 1e-4  # Lens stage 2 (stage 1: 2e-4)


def test_lora_is_lens_rl_adapters_at_a_higher_lr():
    _, train = sections("lens-lora.yaml")
    lora = train.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (64, 128.0, 0.0, LORA_TARGETS)
    assert lora.base_dtype == "auto" and train.parallel.strategy == "ddp"
    _, full = sections("lens-finetune.yaml")
    assert train.optim.lr == 2e-4 and full.optim.lr < train.optim.lr <= 4e-4


def test_lens_turbo_holds_the_papers_distillation_recipe_on_the_fine_tune_shards():
    cfg = load_section("distill", str(CONFIGS / "lens-turbo.yaml"), [])
    pre, _ = sections("lens-finetune.yaml")
    assert cfg.teacher == cfg.init_from == RELEASE and (cfg.codec, cfg.text_encoder) == (pre.codec, pre.text_encoder)
    assert (cfg.student_steps, cfg.guidance, cfg.sample.steps, cfg.sample.cfg) == (4, 5.0, 4, 1.0)
    assert (cfg.losses.dm, cfg.losses.ca, cfg.losses.gan, cfg.losses.disc) == (1.0, 1.0, 1e-3, 0.1)
    assert (cfg.fake.updates, cfg.fake.ema, cfg.fake.lr, cfg.optim.lr) == (4, 0.03, 5e-7, 5e-7)
    assert (cfg.disc.lr, cfg.disc.r1_gamma, cfg.disc.r1_alpha) == (1e-4, 1.0, 0.1)
    assert cfg.max_steps <= 1000 and cfg.parallel.strategy == "fsdp" and cfg.precision == "bf16"
    assert sorted(cfg.data.batch_sizes) == pre.buckets.base_sides


def test_lens_rl_holds_the_papers_recipe_lora_on_the_release_and_a_mini_judge():
    cfg = load_section("rl", str(CONFIGS / "lens-rl.yaml"), [])
    assert cfg.init == cfg.init_from == RELEASE and cfg.reward == "judge" and cfg.judge.model == "gpt-4.1-mini"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (64, 128.0, LORA_TARGETS)
    assert (cfg.optim.lr, cfg.kl, cfg.max_steps) == (3e-4, 1e-4, 180)
    assert cfg.rollout.prompts * 8 == 48 and cfg.rollout.images == 24  # per rank on the 8 GPUs its comment names
    assert cfg.rollout.cfg == 1.0 and cfg.rollout.size == 1024 and cfg.parallel.strategy == "fsdp"
    assert cfg.judge.max_cost_usd is None  # the budget is the command's (--max-cost-usd), as its comment shows
