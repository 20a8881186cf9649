"""Typed configuration of `lensforge caption` (the `caption:` section of a lensforge YAML file).

The resolved section is saved as DATA/config.caption.yaml (beside DATA/captions, which holds Parquet parts only).
It never holds an API key: only the *name* of the environment variable that does (`api_key_env`).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_base_url(url: str) -> str:
    """`url` if it can be asked at all: http(s), a host, a port in 1..65535 if any, no white space. Checked when the
    config is built, so `--base-url htp://…` or a port like 186311 is one line at start-up, not a run of retries."""
    if any(c.isspace() for c in url):
        raise ValueError(f"base URL {url!r}: contains white space")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        got = f"not {parts.scheme!r}" if parts.scheme and parts.netloc else f"none given: http://{url}?"
        raise ValueError(f"base URL {url!r}: the scheme must be http:// or https:// ({got})")
    if not parts.hostname:
        raise ValueError(f"base URL {url!r}: no host")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"base URL {url!r}: the port must be a number from 1 to 65535")
    return url


class Price(_Strict):
    """USD per 1M tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class AzureConfig(_Strict):
    """Azure OpenAI: the deployment name replaces the model name in requests."""

    endpoint: str = Field(description="https://<resource>.openai.azure.com")
    api_version: str = "2024-10-21"
    deployment: str

    _valid_endpoint = field_validator("endpoint")(check_base_url)


class BatchConfig(_Strict):
    """The OpenAI Batch API mode (`--batch-api`, captioning/batch.py): half price, results within a day."""

    completion_window: str = "24h"
    max_requests_per_file: int = Field(50_000, ge=1, description="the API's limit per input file")
    max_file_mb: float = Field(190.0, gt=0, description="under the API's 200 MB input-file limit")
    poll_s: float = Field(60.0, gt=0, description="seconds between status polls of a submitted batch")


class CaptionConfig(_Strict):
    # What to ask, and whom.
    base_url: str | None = Field(None, description="OpenAI-compatible /v1 URL; None = api.openai.com")
    model: str | None = Field(None, description="e.g. gpt-4.1-mini; required")
    variants: list[str] = Field(["dense"], description="preset names, or name=path/to/prompt.txt")
    prompt_file: str | None = Field(None, description="a user prompt; usable as a variant named by the file stem")
    json_mode: bool = Field(False, description="all variants of a key in one request, answered as one JSON object")
    alt_hint: bool = Field(False, description="show the original alt text as a (possibly wrong) hint, CapsFusion")
    language: str | None = Field("en", description="expected caption language; None = not checked")
    word_ranges: dict[str, tuple[int, int]] = Field(
        {}, description="per-variant (min, max) words accepted by the checks; overrides the preset's")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, description="max completion tokens; None = the preset's")
    retry_failed_checks: int = Field(1, ge=0, description="re-asks of a key whose answer failed a check")

    # The image as sent.
    max_side: int = Field(768, ge=32, description="longest side after resizing, pixels")
    detail: Literal["low", "high", "auto"] = "auto"
    jpeg_quality: int = Field(90, ge=1, le=100)

    # Credentials and endpoints (names only, never the secret).
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    azure: AzureConfig | None = None
    batch: BatchConfig = BatchConfig()
    batch_api: bool = False

    # Cost.
    prices: dict[str, Price] = Field({}, description="model -> USD per 1M tokens; overrides the built-in table")
    max_cost_usd: float | None = Field(None, gt=0, description="stop cleanly before this much is spent")
    dry_run_sample: int = Field(50, ge=1, description="pending images the dry run measures")

    # Throughput and failure handling.
    workers: int = Field(1, ge=1, description="Ray actors, each with its own event loop; 1 = in-process")
    ray_address: str | None = None
    concurrency: int = Field(64, ge=1, description="requests in flight per worker (the AIMD ceiling)")
    max_attempts: int = Field(6, ge=1, description="tries of one request on 429/5xx/timeouts/connection errors")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    backoff_s: float = Field(1.0, gt=0, description="first backoff; doubles per attempt, jittered")
    backoff_max_s: float = Field(60.0, gt=0)
    chunk_size: int = Field(256, ge=1, description="keys whose images are read and resized together")
    # Every answer is journaled as it arrives (captioning/journal.py); parts are compacted from the journal.
    flush_rows: int = Field(512, ge=1, description="rows per Parquet part, at most")
    flush_s: float = Field(5.0, gt=0, description="compact the journal into a Parquet part at least this often")
    drain_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT: seconds to wait for the requests in flight "
                                                   "before abandoning them (a second signal abandons at once)")

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        return value if value is None else check_base_url(value)

    @field_validator("variants")
    @classmethod
    def _some_variants(cls, value: list[str]) -> list[str]:
        names = [v.partition("=")[0].strip() for v in value]
        if not value or any(not n for n in names):
            raise ValueError("at least one variant, each a preset name or name=path")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variants in {value}")
        return value
