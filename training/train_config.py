"""Typed configuration of `lensforge train` (the `train:` section of a lensforge YAML file).

    train:
      preset: small
      model: {prediction: x}                 # any ModelConfig field, over the preset
      data: {captions: {dense: 0.5, alt: 0.5}, batch_sizes: {512: 24, 768: 10, 1024: 6}}
      buckets: {base_sides: [512, 768, 1024]}   # the shards' table must be this one (precompute.buckets)
      optim: {lr: 2.0e-4, betas: [0.9, 0.999], grad_clip: 1.0}
      parallel: {strategy: fsdp, activation_checkpointing: true}
      init_from: /models/Lens                # fine-tune: a release, transformer/ folder, single file or run
      lora: {rank: 64, alpha: 128}           # …with adapters only (peft), the base frozen

This module imports no torch, so every `lensforge` command starts fast. Lens's published choices are the defaults
where a choice is Lens's (AdamW 0.9/0.999, constant LR 2e-4, clip 1.0, caption dropout 0.1); CPU-RECIPES.md's
tiny-model recipe is spelled out in tests/training/test_learns.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.config import ModelConfig, get_preset, list_models
from training.caption_variants import stored_variant
from training.precompute_config import BucketsConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    shard_set: str | None = Field(None, description="set id under DATA/shards; None = the set matching this config")
    captions: dict[str, float] = Field({"dense": 1.0}, description="caption variant → probability, per sample")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="empty caption (no text tokens) for CFG")
    batch_size: int = Field(64, ge=1, description="micro-batch per rank for base sides not in batch_sizes")
    batch_sizes: dict[int, int] = Field({}, description="base side → micro-batch per rank (Lens: 512: 24, 768: "
                                        "10, 1024: 6), so that every rank's step takes about as long")
    shuffle_buffer: int = Field(256, ge=1, description="samples shuffled together within a shard")
    prefetch: int = Field(4, ge=0, description="batches a background thread prepares ahead on CUDA; 0 = inline. "
                          "On a CPU device loading is inline: a thread there slows the step more than it saves")
    holdout: float = Field(0.0, ge=0, lt=1, description="fraction of keys (by hash) kept out of training for val")

    @field_validator("captions")
    @classmethod
    def _mix(cls, mix: dict[str, float]) -> dict[str, float]:
        if not mix or any(p < 0 for p in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"caption mix {mix} needs at least one variant with a positive weight")
        for name in mix:
            stored_variant(name)  # ValueError naming a malformed one
        return mix

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, sizes: dict[int, int]) -> dict[int, int]:
        if any(b < 1 for b in sizes.values()):
            raise ValueError(f"batch sizes must be ≥ 1: {sizes}")
        return sizes


class OptimConfig(_Strict):
    lr: float = Field(2e-4, ge=0, description="Lens: constant 2e-4 (stage 2: 1e-4); 0 checks an import")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0, then constant")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; None = no clipping")


class EMAConfig(_Strict):
    decay: float = Field(0.9999, ge=0, lt=1)
    device: Literal["same", "cpu"] = Field("same", description="cpu keeps the EMA off the accelerator")
    every: int = Field(1, ge=1, description="update every N steps (decay applied as decay^N)")


class ParallelConfig(_Strict):
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with several processes (torchrun)")
    activation_checkpointing: bool = Field(False, description="recompute each block in the backward")
    compile: bool = Field(False, description="torch.compile each block")
    reshard_after_forward: bool = Field(True, description="FSDP: free gathered block weights after forward")


# The released module names LoRA targets by default (Lens-RL: r 64 / α 128 on the attention and MLP projections);
# peft matches a target against the end of a module's dotted name.
LORA_TARGETS = ["attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out",
                "img_mlp.w1", "img_mlp.w2", "img_mlp.w3", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3"]


class LoraConfig(_Strict):
    rank: int = Field(64, ge=1, description="adapter rank r (Lens-RL: 64)")
    alpha: float = Field(128.0, gt=0, description="scale α: the update is (α / r)·B·A (Lens-RL: 128)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(LORA_TARGETS, min_length=1, description="module names (suffixes of the released "
                               "names, e.g. attn.img_qkv) that get adapters")
    base_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="the frozen base's weights: auto = bfloat16 on CUDA, float32 on CPU")


class ValConfig(_Strict):
    every: int = Field(0, ge=0, description="validation loss every N steps; 0 = off (needs data.holdout > 0)")
    samples: int = Field(64, ge=1, description="held-out samples used (the first ones found, fixed)")
    timesteps: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    batch_size: int = Field(32, ge=1)
    captions: str | None = Field(None, description="stored caption variant of the validation loss; None = the "
                                 "mix's most likely (a random-length one: its base). Runs that train on different "
                                 "captions compare their curves on one variant (lensforge ablate sets dense)")

    @field_validator("captions")
    @classmethod
    def _stored(cls, name: str | None) -> str | None:
        if name is not None and stored_variant(name) != name:
            raise ValueError(f"val.captions {name!r} is cut per draw; name a stored variant ({stored_variant(name)})")
        return name


class SampleConfig(_Strict):
    every: int = Field(0, ge=0, description="sample grid from the EMA weights every N steps; 0 = off")
    prompts: list[str] = Field([
        "One object on a plain white background. A large red circle in the top left.",
        "One object on a plain black background. A large blue square in the center.",
        "One object on a plain gray background. A large yellow triangle in the bottom right.",
        "One object on a plain white background. A large green star in the middle left.",
    ], min_length=1)
    steps: int = Field(25, ge=1)
    cfg: float = Field(4.0, ge=0, allow_inf_nan=False)
    seed: int = 0
    size: int | None = Field(None, ge=16, description="square side in pixels; None = the model's base_size")


class TrainConfig(_Strict):
    preset: str = Field("tiny", description=f"model preset: {', '.join(list_models())}")
    model: dict[str, Any] = Field({}, description="ModelConfig fields over the preset, e.g. {prediction: x}")
    codec: str = Field("pixel", description="what the shards' latents were made with; sampling uses it")
    text_encoder: str = Field("minilm", description="what the shards' text features were made with")
    encoders: dict[str, Any] = Field({}, description="further encoders.json fields the shards must match")
    buckets: BucketsConfig | None = Field(None, description="the bucket table the shards must have been made with "
                                          "(precompute.buckets' fields); None = whichever the shards have")
    init_from: str | None = Field(None, description="start from these weights (anything `load_denoiser` reads: a "
                                  "Lens release, its transformer/ folder, a single file, a lensforge run or "
                                  "checkpoint) at step 0, fresh optimizer, EMA from them; the model is theirs")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only (needs init_from); checkpoints "
                                    "hold the adapters and the base's fingerprint")

    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    parallel: ParallelConfig = ParallelConfig()
    val: ValConfig = ValConfig()
    sample: SampleConfig = SampleConfig()

    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1, description="keep the last K step directories")
    log_every: int = Field(10, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    deterministic: bool = Field(False, description="deterministic kernels (the resume test's bitwise mode)")
    max_bad_steps: int = Field(10, ge=1, description="consecutive non-finite steps before training stops")
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU (H100 bf16 dense: 989)")
    progress: bool = Field(True, description="tqdm progress bar on rank 0")

    @field_validator("preset")
    @classmethod
    def _preset(cls, name: str) -> str:
        get_preset(name)  # LookupError naming the known presets
        return name

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        self.model_config_resolved()  # fail at load time on a bad override
        if self.lora is not None and not self.init_from:
            raise ValueError("train.lora needs train.init_from: the base the adapters fine-tune")
        if self.val.every and not self.data.holdout:
            raise ValueError("val.every > 0 needs data.holdout > 0 (a held-out set)")
        return self

    def model_config_resolved(self) -> ModelConfig:
        base = get_preset(self.preset)
        if not self.model:
            return base
        return ModelConfig.model_validate({**base.model_dump(), **self.model})

    def batch_size_for(self, base: int) -> int:
        return self.data.batch_sizes.get(base, self.data.batch_size)
