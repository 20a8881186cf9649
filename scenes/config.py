"""Typed configuration of `lensforge scenes render` (the `scenes:` section of a lensforge YAML file)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from scenes.scene import RICH_WORD_PROB


class ScenesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(2000, ge=1, description="scenes to render (faulty entries included)")
    size: int = Field(256, ge=16, description="side of the square renders, pixels")
    seed: int = 0
    faults: float = Field(0.1, ge=0, le=1, description="fraction of URL-list rows that carry a web fault")
    min_objects: int = Field(1, ge=1, le=4)
    max_objects: int = Field(4, ge=1, le=4)
    word_prob: float = Field(0.2, ge=0, le=1, description="chance that a scene carries a short rendered word "
                             f"(default 0.2; {RICH_WORD_PROB} in the rich world)")
    base_url: str | None = Field(None, description="URL prefix in urls.parquet; default http://127.0.0.1:8000")
    world: Literal["basic", "rich"] = Field("basic", description="scene world (scenes/scene.py): rich adds fills, "
                                            "a frame and placed words, 2-3 objects, 80-120-word dense captions")

    @model_validator(mode="before")
    @classmethod
    def _rich_word_prob(cls, data: Any) -> Any:
        """The rich world draws words more often unless word_prob is set."""
        if isinstance(data, dict) and data.get("world") == "rich" and "word_prob" not in data:
            return {**data, "word_prob": RICH_WORD_PROB}
        return data

    @model_serializer(mode="wrap")
    def _basic_unchanged(self, handler) -> dict[str, Any]:
        """A basic config dumps without `world`: its resolved file and stage key (pipelines/stage_cache.py hashes the
        dump) stay what they were before the rich world existed, so finished demo stages are not redone."""
        data = handler(self)
        if self.world == "basic":
            data.pop("world", None)
        return data
