"""Typed configuration of `lensforge curate` (the `curate:` section of a lensforge YAML file)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DownloadConfig(_Strict):
    """img2dataset settings and the per-response cost bounds the URL guard enforces."""

    shard_size: int = Field(10_000, ge=1, description="URLs per img2dataset shard (its number_sample_per_shard)")
    processes: int = Field(0, ge=0, description="concurrent shard downloads; 0 = Ray decides (one per CPU)")
    threads: int = Field(64, ge=1, description="download threads per shard")
    timeout_s: float = Field(10.0, gt=0, description="socket timeout of one read")
    max_seconds: float = Field(30.0, gt=0, description="wall-clock cap on one response, dribbling servers included")
    max_bytes: int = Field(20 * 2**20, gt=0, description="body size cap of one response")
    max_pixels: int = Field(64 * 2**20, gt=0, description="width×height from the image header; above = bomb")
    retries: int = Field(0, ge=0)
    user_agent_token: str | None = "lensforge"
    # img2dataset's opt-out handling: X-Robots-Tag directives that refuse an image. Kept on by default.
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]


class ModelFiltersConfig(_Strict):
    """One CLIP image-embedding pass feeds every model filter. A head with no weights configured is skipped
    (its column stays null): never random weights in a real run."""

    clip_model: str | None = Field(None, description="open_clip architecture name, or a path to its JSON config")
    clip_weights: str | None = Field(None, description="local path to the CLIP checkpoint (or an open_clip tag)")
    aesthetic_head: str | None = None
    nsfw_head: str | None = None
    watermark_head: str | None = None
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1, description="CLIP actors (one model copy each)")
    min_clip_score: float = 0.20  # cosine(image, alt text); LAION used 0.28 with ViT-B/32
    min_aesthetic: float = 4.5
    max_nsfw: float = 0.5
    max_watermark: float = 0.5


class DedupConfig(_Strict):
    exact: bool = True  # hash of decoded pixels
    phash: bool = True  # perceptual hash, the pixel-only near-duplicate path
    phash_max_distance: int = Field(4, ge=0, le=32, description="Hamming distance of 64-bit pHashes")
    # pHash pairs are confirmed on 8×8 RGB thumbnails: simple images (flat backgrounds, few objects) share pHashes
    # without being copies. Measured on the scene world: re-encoded resized copies differ by <= 2 levels; unrelated
    # scenes within pHash distance 10 by >= 51 (1st percentile). 255 disables the check.
    phash_verify_max_diff: int = Field(16, ge=0, le=255, description="max |Δ| of any thumbnail channel value")
    clip: bool = True  # CLIP cosine, when embeddings exist
    clip_threshold: float = 0.985  # Lens's threshold
    cluster_size: int = Field(50_000, ge=2, description="k-means partitions of about this many images each")
    keep: Literal["first", "best"] = "first"  # which copy keeps its place: first seen, or best aesthetic/clip


class CurateConfig(_Strict):
    url_col: str = "url"
    caption_col: str = "caption"
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="hosts, IPs or CIDRs admitted although private/loopback (e.g. 127.0.0.1 for local data)",
    )
    # Pixel filters (no model). Lens: minimum area 384².
    min_area: int = Field(384 * 384, ge=0)
    min_aspect: float = Field(0.5, gt=0, description="width / height, 1:2")
    max_aspect: float = Field(2.0, gt=0, description="width / height, 2:1")
    min_blur: float = Field(100.0, ge=0, description="variance of the Laplacian of the grayscale image")
    min_entropy: float = Field(3.0, ge=0, description="bits, grayscale 256-bin histogram")
    min_luminance: float = Field(0.05, ge=0, le=1, description="mean HSV value")
    max_luminance: float = Field(0.98, ge=0, le=1)
    download: DownloadConfig = DownloadConfig()
    models: ModelFiltersConfig = ModelFiltersConfig()
    dedup: DedupConfig = DedupConfig()

    @model_validator(mode="after")
    def _ranges(self) -> "CurateConfig":
        if self.min_aspect >= self.max_aspect:
            raise ValueError(f"min_aspect {self.min_aspect} must be below max_aspect {self.max_aspect}")
        if self.min_luminance >= self.max_luminance:
            raise ValueError(f"min_luminance {self.min_luminance} must be below max_luminance {self.max_luminance}")
        return self
