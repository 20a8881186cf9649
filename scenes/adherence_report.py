"""The numbers of a prompt-adherence evaluation (`scenes.adherence`): per-category and overall pass rates with
bootstrap 95 % confidence intervals, the empirical chance level beside them, JSON and a Markdown table.

    result = score(items, images)          # scenes.adherence
    print(result.to_markdown())
    json.dumps(result.to_dict())

Bootstrap: items are resampled with replacement within each category (RESAMPLES times, a fixed seed); a category's
interval is the 2.5–97.5 percentile of its resampled means, and the overall interval comes from the same
resamples, every category drawn together, averaged over categories (overall = mean of category means, as GenEval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scenes.scene import Scene

RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap 95 % interval."""

    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": round(self.mean, 4), "ci95": [round(self.low, 4), round(self.high, 4)]}

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


@dataclass(frozen=True)
class ItemScore:
    category: str
    prompt: str
    passed: bool
    target: Scene
    parsed: Scene

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "prompt": self.prompt, "passed": self.passed,
                "target": self.target.to_dict(), "parsed": self.parsed.to_dict()}


@dataclass(frozen=True)
class CategoryScore:
    category: str
    n: int
    passed: int
    score: Estimate
    chance: Estimate | None  # None with fewer than 2 items: nothing to shuffle against

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "passed": self.passed, "score": self.score.to_dict(),
                "chance": None if self.chance is None else self.chance.to_dict()}


@dataclass(frozen=True)
class Result:
    categories: tuple[CategoryScore, ...]
    overall: Estimate
    chance: Estimate | None  # None when some category has no chance level
    items: tuple[ItemScore, ...]
    resamples: int

    def category(self, name: str) -> CategoryScore:
        for c in self.categories:
            if c.category == name:
                return c
        raise KeyError(f"no category {name!r} in this result; have: {', '.join(c.category for c in self.categories)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "chance": None if self.chance is None else self.chance.to_dict(),
            "categories": {c.category: c.to_dict() for c in self.categories},
            "bootstrap": {"resamples": self.resamples, "seed": BOOTSTRAP_SEED, "interval": 0.95},
            "items": [item.to_dict() for item in self.items],
        }

    def to_markdown(self) -> str:
        lines = ["| category | n | passed | score (95 % CI) | chance (95 % CI) |", "|---|---:|---:|---|---|"]
        for c in self.categories:
            chance = "–" if c.chance is None else c.chance.text()
            lines.append(f"| {c.category} | {c.n} | {c.passed} | {c.score.text()} | {chance} |")
        n, passed = sum(c.n for c in self.categories), sum(c.passed for c in self.categories)
        chance = "–" if self.chance is None else self.chance.text()
        lines.append(f"| **overall** (mean of categories) | {n} | {passed} | **{self.overall.text()}** | {chance} |")
        return "\n".join(lines)


def bootstrap(values: dict[str, np.ndarray], resamples: int = RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> tuple[dict[str, Estimate], Estimate]:
    """Per-category mean of `values` (category -> per-item values) and the mean over categories, each with a
    percentile-bootstrap 95 % interval: items resampled within their category, all categories in each resample."""
    if not values or any(len(v) == 0 for v in values.values()):
        raise ValueError("bootstrap needs at least one item in every category")
    rng = np.random.default_rng(seed)
    per_category, draws = {}, []
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)  # (resamples,)
        per_category[name] = _estimate(float(v.mean()), means)
        draws.append(means)
    overall = float(np.mean([np.mean(v) for v in values.values()]))
    return per_category, _estimate(overall, np.mean(draws, axis=0))


def _estimate(mean: float, draws: np.ndarray) -> Estimate:
    low, high = np.percentile(draws, [2.5, 97.5])
    # A percentile interval can miss the point estimate by float rounding when every draw is equal.
    return Estimate(mean, min(float(low), mean), max(float(high), mean))


def summarize(hits: dict[str, np.ndarray], chance: dict[str, np.ndarray | None], items: tuple[ItemScore, ...],
              resamples: int = RESAMPLES) -> Result:
    """A Result from per-item pass (0/1) and per-item chance values, both keyed by category in report order."""
    scores, overall = bootstrap(hits, resamples)
    with_chance = {name: v for name, v in chance.items() if v is not None}
    chances, overall_chance = bootstrap(with_chance, resamples) if with_chance else ({}, None)
    if len(with_chance) < len(hits):
        overall_chance = None
    categories = tuple(
        CategoryScore(name, len(h), int(np.sum(h)), scores[name], chances.get(name)) for name, h in hits.items()
    )
    return Result(categories, overall, overall_chance, items, resamples)
