"""Typed configuration of `lensforge rl` (the `rl:` section): the trainer's fields plus DiffusionNFT's recipe.

    rl:
      init: runs/demo                        # anything `load_denoiser` reads; the policy and the reference start here
      prompts: prompts.jsonl                 # one prompt a line, or JSONL (training/rl_prompts.py)
      reward: scenes                         # or judge: an OpenAI-compatible vision model answering a rubric
      rollout: {prompts: 48, images: 24, steps: 16, cfg: 1.0}
      beta: 1.0                              # DiffusionNFT's β (the implicit policies' step)
      kl: 1.0e-4                             # weight of the velocity KL to the frozen reference
      old: {ramp: 0.001, max: 0.5}           # the sampling policy: θ_old ← η·θ_old + (1 − η)·θ, η = min(ramp·i, max)
      lora: {rank: 64, alpha: 128}           # Lens-RL: LoRA on the released weights
      optim: {lr: 3.0e-4}
      max_steps: 180

Every `train:` field means what it means there (optim, ema, lora, parallel, checkpoints); `init_from` is `init`.
There are no shards, so `data` and `val` are unused. The defaults are Lens-RL's recipe as the issue reads it
(configs/lens-rl.yaml spells it out for the 3.8 B model); docs/rl/ has the tiny-model settings that work on a
CPU. Imports no torch, like train_config.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from captioning.config import Price, check_base_url
from training.train_config import EMAConfig, OptimConfig, TrainConfig, _Strict


class RolloutConfig(_Strict):
    prompts: int = Field(48, ge=1, description="prompts per step and rank (Lens-RL: 48)")
    images: int = Field(24, ge=2, description="images per prompt, the group its rewards are centred in (Lens-RL: "
                        "24); at least 2, or no prompt has a reward spread")
    steps: int = Field(16, ge=1, le=100, description="sampling steps of a rollout (DiffusionNFT takes any "
                       "sampler; Lens does not say its own): the checkpoints record it as generate's default")
    cfg: float = Field(1.0, ge=1, allow_inf_nan=False, description="CFG of the rollouts; 1 = none (DiffusionNFT "
                       "trains CFG-free): the checkpoints record it as generate's default")
    size: int | None = Field(None, ge=16, multiple_of=16, description="square side in pixels; None = the model's "
                             "base size")
    batch_size: int = Field(64, ge=1, description="rollouts sampled together (memory, not the result)")


class OldPolicyConfig(_Strict):
    """DiffusionNFT's soft update of the sampling policy: after step i, θ_old ← η_i·θ_old + (1 − η_i)·θ with
    η_i = min(ramp·i, max): on-policy at first, then lagging behind the trained weights for stability."""

    ramp: float = Field(0.001, ge=0, le=1)
    max: float = Field(0.5, ge=0, lt=1)


class JudgeConfig(_Strict):
    """The rubric judge (`reward: judge`): an OpenAI-compatible vision model, through captioning's client."""

    base_url: str | None = Field(None, description="OpenAI-compatible /v1 URL; None = api.openai.com")
    model: str = Field("gpt-4.1-mini", description="the judge model (Lens-RL: GPT-4.1-mini)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    max_cost_usd: float | None = Field(None, gt=0, description="training stops cleanly (the last checkpoint "
                                       "intact) before the judge's rubrics and answers cost more than this")
    prices: dict[str, Price] = Field({}, description="model -> USD per 1M tokens; overrides the built-in table")
    detail: Literal["low", "high", "auto"] = Field("low", description="image detail of each question")
    concurrency: int = Field(64, ge=1, description="requests in flight per rank (the AIMD ceiling)")
    max_attempts: int = Field(6, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    backoff_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    upscale: int = Field(256, ge=16, description="images smaller than this are sent enlarged (nearest) to it: "
                         "a vision model reads a 32-pixel image badly")

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        return value if value is None else check_base_url(value)


class RLConfig(TrainConfig):
    init: str = Field(..., description="the model to post-train: a run, step, Lens release, transformer/ folder "
                      "or file (anything `load_denoiser` reads); it is also the frozen KL reference")
    prompts: str | None = Field(None, description="the prompt file (text, or JSONL with a `prompt` field)")
    reward: Literal["scenes", "judge"] = Field("scenes", description="scenes: the synthetic scenes' rule reward "
                                               "(GenEval-style, 0/1); judge: the rubric judge's share of yes")
    judge: JudgeConfig = JudgeConfig()
    rollout: RolloutConfig = RolloutConfig()
    old: OldPolicyConfig = OldPolicyConfig()
    beta: float = Field(1.0, gt=0, description="DiffusionNFT's β: v± = the current and sampling policies mixed")
    kl: float = Field(1e-4, ge=0, description="weight of the velocity KL to the frozen reference (Lens-RL: 1e-4); "
                      "0 builds no reference")
    t_min: float = Field(0.0, ge=0, lt=1, description="the loss's t ~ U[t_min, t_max] (DiffusionNFT: U[0, 1])")
    t_max: float = Field(1.0, gt=0, le=1)
    train_batch: int = Field(16, ge=1, description="rollouts per forward / backward (gradients accumulate over "
                             "a step's rollouts: one optimizer step per RL step)")

    optim: OptimConfig = OptimConfig(lr=3e-4, warmup_steps=0)  # Lens-RL: 3e-4
    ema: EMAConfig = EMAConfig(decay=0.9)  # 180 steps: a 0.9999 average would hold the initial weights
    max_steps: int = Field(180, ge=1)  # Lens-RL: 180 steps
    checkpoint_every: int = Field(20, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _init_is_init_from(cls, values: Any) -> Any:
        if isinstance(values, dict) and (values.get("val") or {}).get("every"):  # before the trainer's own check
            raise ValueError("rl.val.every: RL post-training reads no shards, so there is no held-out loss; "
                             "measure it with `lensforge evaluate`")
        if isinstance(values, dict) and values.get("init"):
            given = values.get("init_from")
            if given and given != values["init"]:
                raise ValueError(f"rl.init_from {given!r} differs from rl.init {values['init']!r} (set init only)")
            values = {**values, "init_from": values["init"]}
        return values

    @model_validator(mode="after")
    def _recipe(self) -> "RLConfig":
        if self.t_min >= self.t_max:
            raise ValueError(f"rl.t_min {self.t_min} must be below t_max {self.t_max}")
        return self
