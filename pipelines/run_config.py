"""Typed configuration of `lensforge run` (the `run:` section of a pipeline YAML file): where the inputs are, where
the outputs go, how training is launched, and what the final sample grid shows.

    run:
      urls: my_urls.parquet          # the URL list curate downloads
      out: lensforge-out             # DATA = OUT/data, RUN = OUT/run (or set data / train_dir)
      nproc_per_node: 8              # > 1: training under torchrun
      sample: {prompts: ["a red fox in the snow"], size: 512}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

STAGES = ("curate", "caption", "precompute", "train", "sample", "report")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridConfig(_Strict):
    prompts: list[str] = Field([], description="fixed prompts for the final grid; empty = the adherence prompts")
    adherence: bool = Field(False, description="score prompt adherence with scenes/ (synthetic scene data only)")
    per_category: int = Field(8, ge=1, description="adherence prompts per category (scenes.adherence)")
    size: int | None = Field(None, ge=16, description="square side in pixels; None = the model's base size")
    steps: int = Field(25, ge=1)
    cfg: float = Field(4.0, ge=0)
    seed: int = 0
    batch_size: int = Field(16, ge=1)


class RunConfig(_Strict):
    urls: str | None = Field(None, description="URL list (parquet/csv/jsonl/txt) for curate; None = skip curate")
    out: str = Field("lensforge-out", description="output root: DATA = OUT/data, RUN = OUT/run")
    data: str | None = Field(None, description="data directory (manifest, captions, shards, reports)")
    train_dir: str | None = Field(None, description="training run directory (checkpoints, metrics, samples)")
    ray_address: str | None = Field(None, description="Ray cluster for curate/caption/precompute; None = local")
    nproc_per_node: int = Field(1, ge=1, description="training processes on this node; > 1 runs torchrun")
    torchrun_args: list[str] = Field([], description="more torchrun flags, e.g. [--nnodes=2, --node-rank=0, "
                                     "--rdzv-endpoint=HOST:29500]")
    sample: GridConfig = GridConfig()
