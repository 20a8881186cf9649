"""Typed configuration of `lensforge precompute` (the `precompute:` section of a lensforge YAML file).

Everything that changes the stored tensors goes into the shard set's `encoders.json` (training/cache_key.py,
`encoders_record`); the rest (actors, batch sizes, budget, small-bucket policy) only changes how the run goes.
"""

from __future__ import annotations

import datetime
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.caption_variants import split_variant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BucketsConfig(_Strict):
    """The aspect-bucket table (training/buckets.py owns the defaults: Lens's 3 base areas × 9 ratios). This file
    imports no torch, so every `lensforge` command starts fast."""

    base_sides: list[int] | None = Field(None, min_length=1, description="base areas as sides (512 = 512²); "
                                         "None = Lens's 512, 768, 1024")
    ratios: list[str] | None = Field(None, min_length=1, description="width:height; None = Lens's 1:2 … 2:1")
    multiple: int | None = Field(None, ge=1, description="bucket sides are multiples of this; None = the codec's")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, ratios: list[str] | None) -> list[str] | None:
        for r in ratios or ():
            if not re.fullmatch(r"[1-9]\d*:[1-9]\d*", r):
                raise ValueError(f"ratio {r!r} is not W:H with positive integers")
        return ratios


class PrecomputeConfig(_Strict):
    # What to encode, with what.
    codec: str = Field("pixel", description="pixel | pixel:F | flux2:PATH (inference/codecs.py)")
    text_encoder: str = Field("minilm", description="minilm | hf:PATH@layers | gpt-oss:PATH (inference/text.py)")
    # Fixed, so that a rerun on another day makes the same shard set (Lens's pipeline renders today's date).
    text_date: str = Field("2025-08-05", description="the chat's 'Current date' (YYYY-MM-DD) for gpt-oss encoders")
    variants: list[str] = Field(["dense"], min_length=1, description="caption variants; `alt` = the manifest's alt; "
                                "`dense@15` = dense cut to its first 15 words (training/caption_variants.py)")
    # Whose captions (captioning/schema.py, `choose_sources`); the choice goes into encoders.json.
    caption_model: str | None = Field(None, description="read this captioner's captions (caption.model); None = "
                                      "the only captioner DATA's ok captions hold")
    caption_prompts: dict[str, str] = Field({}, description="variant → prompt_id to read; default: the only one, "
                                            "or the built-in preset's current version")
    codec_dtype: Literal["float32", "bfloat16"] = Field("float32", description="the codec's compute dtype")
    text_encoder_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the text encoder's compute dtype (bfloat16 for GPT-OSS-20B on a GPU)")

    # How it is stored.
    buckets: BucketsConfig = BucketsConfig()
    crop: Literal["center"] = "center"
    # No flipping: dense captions say "top left"; a mirrored image would contradict its own caption.
    flip: Literal["none"] = "none"
    latent_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    text_dtype: Literal["bfloat16", "float8_e4m3fn"] = Field(
        "bfloat16", description="float8_e4m3fn stores a float32 scale per token beside the features")
    shard_size: int = Field(1000, ge=1, description="samples per output tar")

    # Which samples, and what to do with thin buckets.
    min_bucket_samples: int = Field(0, ge=0, description="buckets with fewer samples are merged or dropped; 0 = off")
    small_buckets: Literal["merge", "drop"] = Field(
        "merge", description="merge: into the nearest ratio at the same base area that is big enough")
    max_pixels: int = Field(64 * 2**20, gt=0, description="width×height above which an image is refused (bomb)")

    # Guard rails.
    disk_budget_gb: float | None = Field(None, gt=0, description="refuse to start when the estimate is above this")
    estimate_sample: int = Field(256, ge=1, description="captions per variant encoded to estimate text length")

    # Throughput.
    batch_size: int = Field(32, ge=1, description="images per encoder call")
    decode_batch_size: int = Field(16, ge=1, description="images per decode/resize task")
    encoder_actors: int = Field(1, ge=1, description="encoder actors (one codec + text-encoder copy each)")
    gpus_per_actor: float | None = Field(None, ge=0, description="None = 1 when the Ray cluster has GPUs, else 0")
    cpus_per_actor: float = Field(1.0, ge=0, description="also the torch threads of a CPU-only actor")

    @field_validator("text_date")
    @classmethod
    def _date(cls, date: str) -> str:
        try:
            return datetime.date.fromisoformat(date).isoformat()
        except ValueError:
            raise ValueError(f"text_date {date!r} is not YYYY-MM-DD") from None

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"duplicate variants in {variants}")
        for name in variants:
            split_variant(name)  # ValueError naming the bad one
        return variants
