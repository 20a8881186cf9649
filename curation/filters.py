"""Lens's filter chain as one ordered list: every reject reason, where it is decided, the score column it reads,
its test, and what it refuses with the setting that changes it. The manifest's reasons and their order
(`REJECT_REASONS`), the score columns of filtered parts and the manifest (`SCORE_COLUMNS`), the pixel and model
checks (`first_reason`) and the funnel's hints (`hint`) all derive from `CHAIN`, so the order is written once.

    first_reason("pixel", {"width": 64, "height": 64, "blur": 80.0, ...}, cfg)   # "min_area"
    first_reason("model", {"clip_score": 0.1, ...}, cfg.models)                  # "clip_score"
    hint("min_area", cfg)   # ("images below 147456 px = 384²", "lower curate.min_area to keep them")

A check never rejects on a missing score (None or NaN: that filter did not run, or the row has no alt text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curation.config import CurateConfig


@dataclass(frozen=True)
class Filter:
    reason: str  # the manifest's reject_reason
    stage: str  # where it is decided: guard (driver), download, decode, pixel, model (filter actors), dedup
    refuses: Callable[[CurateConfig], str]  # what it refuses, with the configured threshold
    remedy: str  # the setting to change to keep those rows; "" = no hint (the funnel says nothing)
    score: str | None = None  # the float column it reads and records (filtered parts, manifest)
    test: Callable[[dict, Any], bool] | None = None  # (row, its stage's config section) → rejected


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _below(score: str, threshold: Callable[[Any], float]) -> Callable[[dict, Any], bool]:
    return lambda row, cfg: _known(row.get(score)) and row[score] < threshold(cfg)


def _above(score: str, threshold: Callable[[Any], float]) -> Callable[[dict, Any], bool]:
    return lambda row, cfg: _known(row.get(score)) and row[score] > threshold(cfg)


def _outside(score: str, low: Callable[[Any], float], high: Callable[[Any], float]) -> Callable[[dict, Any], bool]:
    return lambda row, cfg: _known(row.get(score)) and not low(cfg) <= row[score] <= high(cfg)


def _area(cfg: CurateConfig) -> str:
    side = math.isqrt(cfg.min_area)
    return f"{cfg.min_area} px" + (f" = {side}²" if side * side == cfg.min_area else "")


CHAIN: tuple[Filter, ...] = (
    Filter("unsafe_url", "guard", lambda c: "refused by the URL guard",
           "admit the hosts you trust with --allow-hosts (curate.allow_hosts)"),
    Filter("failed_download", "download", lambda c: "see the manifest's error column",
           "check the URLs and that their server answers"),
    Filter("failed_decode", "decode", lambda c: "not decodable; see the manifest's error column",
           "check what the URLs serve"),
    Filter("min_area", "pixel", lambda c: f"images below {_area(c)}", "lower curate.min_area to keep them",
           test=lambda row, cfg: row["width"] * row["height"] < cfg.min_area),
    Filter("aspect", "pixel", lambda c: f"width / height outside {c.min_aspect:g}-{c.max_aspect:g}",
           "widen curate.min_aspect / curate.max_aspect to keep them",
           test=lambda row, cfg: not cfg.min_aspect <= row["width"] / row["height"] <= cfg.max_aspect),
    Filter("blur", "pixel", lambda c: f"Laplacian variance below {c.min_blur:g}", "lower curate.min_blur to keep them",
           "blur", _below("blur", lambda c: c.min_blur)),
    Filter("entropy", "pixel", lambda c: f"entropy below {c.min_entropy:g} bits",
           "lower curate.min_entropy to keep them", "entropy", _below("entropy", lambda c: c.min_entropy)),
    Filter("luminance", "pixel", lambda c: f"mean luminance outside {c.min_luminance:g}-{c.max_luminance:g}",
           "widen curate.min_luminance / curate.max_luminance to keep them", "luminance",
           _outside("luminance", lambda c: c.min_luminance, lambda c: c.max_luminance)),
    Filter("clip_score", "model", lambda c: f"CLIP score below {c.models.min_clip_score:g}",
           "lower curate.models.min_clip_score to keep them", "clip_score",
           _below("clip_score", lambda m: m.min_clip_score)),
    Filter("aesthetic", "model", lambda c: f"aesthetic score below {c.models.min_aesthetic:g}",
           "lower curate.models.min_aesthetic to keep them", "aesthetic",
           _below("aesthetic", lambda m: m.min_aesthetic)),
    Filter("nsfw", "model", lambda c: f"NSFW score above {c.models.max_nsfw:g}",
           "raise curate.models.max_nsfw to keep them", "nsfw", _above("nsfw", lambda m: m.max_nsfw)),
    Filter("watermark", "model", lambda c: f"watermark score above {c.models.max_watermark:g}",
           "raise curate.models.max_watermark to keep them", "watermark",
           _above("watermark", lambda m: m.max_watermark)),
    # No hint: many duplicates say what the data is, not that a threshold is wrong.
    Filter("duplicate", "dedup", lambda c: "a duplicate of a kept image (the manifest's dup_of)", ""),
)

REJECT_REASONS = tuple(f.reason for f in CHAIN)
SCORE_COLUMNS = tuple(f.score for f in CHAIN if f.score)
BY_REASON = {f.reason: f for f in CHAIN}


def checks(stage: str) -> tuple[str, ...]:
    """The reasons a stage decides, in chain order (e.g. "pixel": min_area, aspect, blur, entropy, luminance)."""
    return tuple(f.reason for f in CHAIN if f.stage == stage)


def first_reason(stage: str, row: dict, cfg) -> str | None:
    """The first of `stage`'s checks that rejects `row` (width, height and scores by column name), or None. `cfg`:
    the stage's section (CurateConfig for pixel checks, its `models` for model checks)."""
    for f in CHAIN:
        if f.stage == stage and f.test is not None and f.test(row, cfg):
            return f.reason
    return None


def hint(reason: str, cfg: CurateConfig) -> tuple[str, str] | None:
    """(what the check refuses, what to change to keep those rows), or None for a reason with no hint."""
    f = BY_REASON.get(reason)
    return None if f is None or not f.remedy else (f.refuses(cfg), f.remedy)
