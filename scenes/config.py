"""Typed configuration of `lensforge scenes render` (the `scenes:` section of a lensforge YAML file)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ScenesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(2000, ge=1, description="scenes to render (faulty entries included)")
    size: int = Field(256, ge=16, description="side of the square renders, pixels")
    seed: int = 0
    faults: float = Field(0.1, ge=0, le=1, description="fraction of URL-list rows that carry a web fault")
    min_objects: int = Field(1, ge=1, le=4)
    max_objects: int = Field(4, ge=1, le=4)
    word_prob: float = Field(0.2, ge=0, le=1, description="chance that a scene carries a short rendered word")
    base_url: str | None = Field(None, description="URL prefix in urls.parquet; default http://127.0.0.1:8000")
