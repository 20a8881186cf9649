"""Intervals that cover training noise: a bootstrap over seeds and prompts together, for one arm and for the
difference of two (pipelines/ablate_report.py reads these).

    table = item_table(records)        # per category: (seeds, prompts) pass matrix, and the chance matrix
    est = crossed(table)               # Estimates: overall and per category
    gap = crossed_difference(a, b)     # a − b, the same prompts resampled for both (paired), seeds apart

Every seed's model answers the same prompt set (item k of a category is the same prompt for every seed), so the
data are a seeds × prompts table per category. One resample draws the seeds with replacement and, independently,
each category's prompts with replacement, and takes the mean of that sub-table: the interval then holds both the
seed-to-seed spread (training noise: init, data order, noise draws) and the prompts' sampling — a bootstrap over
prompts alone would shrink with more prompts however noisy training is. Overall = the mean of category means
(GenEval). With one seed this is the prompt bootstrap. The chance level (each image scored against its category's
other prompts, as scenes.adherence.score computes it) goes through the same resamples.
"""

from __future__ import annotations

import numpy as np

from scenes.adherence import ALL_CATEGORIES, passes
from scenes.adherence_report import BOOTSTRAP_SEED, RESAMPLES, Estimate
from scenes.scene import Scene

Table = dict[str, np.ndarray]  # category → (S, P) float matrix, rows seeds, columns prompts


def _chance(items: list[dict], index: list[int]) -> np.ndarray:
    targets = [Scene.from_dict(items[i]["target"]) for i in index]
    parsed = [Scene.from_dict(items[i]["parsed"]) for i in index]
    cat = items[index[0]]["category"]
    return np.array([np.mean([passes(cat, targets[j], parsed[i]) for j in range(len(index)) if j != i])
                     if len(index) > 1 else np.nan for i in range(len(index))])


def item_table(records: list[dict]) -> tuple[Table, Table]:
    """(pass table, chance table) from one arm's evaluation records, one per seed, all on the same prompt set."""
    hits: dict[str, list] = {}
    chance: dict[str, list] = {}
    for record in records:
        items = record["items"]
        for category in ALL_CATEGORIES:
            index = [i for i, it in enumerate(items) if it["category"] == category]
            if index:
                hits.setdefault(category, []).append([float(items[i]["passed"]) for i in index])
                chance.setdefault(category, []).append(_chance(items, index))
    sizes = {c: {len(row) for row in rows} for c, rows in hits.items()}
    if any(len(v) > 1 for v in sizes.values()):
        raise ValueError(f"the seeds were scored on different prompt sets ({sizes}): re-score them with one")
    return {c: np.array(v) for c, v in hits.items()}, {c: np.array(v) for c, v in chance.items()}


def _draws(tables: list[Table], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Per category, `resamples` means of each table's resampled sub-table: (len(tables), resamples). Prompts are
    drawn once for all tables (paired), seeds per table and once for all categories (a resample is one world)."""
    rng = np.random.default_rng(seed)
    categories = [c for c in ALL_CATEGORIES if all(c in t for t in tables)]
    seeds = [rng.integers(0, n, (resamples, n)) for n in (t[categories[0]].shape[0] for t in tables)]  # (R, S_k)
    out = {}
    for c in categories:
        p = tables[0][c].shape[1]
        prompts = rng.integers(0, p, (resamples, p))  # (R, P)
        # t[c][seeds, prompts] → (R, S_k, P): every resample's sub-table at once
        out[c] = np.stack([np.nanmean(t[c][seeds[k][:, :, None], prompts[:, None, :]], axis=(1, 2))
                           for k, t in enumerate(tables)])
    return out


def _estimate(mean: float, draws: np.ndarray) -> Estimate:
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return Estimate(float(mean), float(low), float(high))


def crossed(table: Table, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Estimate]:
    """Category → Estimate, and "overall" (mean of category means), over seeds × prompts."""
    draws = _draws([table], resamples, seed)
    out = {c: _estimate(np.nanmean(table[c]), d[0]) for c, d in draws.items()}
    overall = np.mean([d[0] for d in draws.values()], axis=0)
    out["overall"] = _estimate(float(np.mean([np.nanmean(table[c]) for c in draws])), overall)
    return out


def crossed_difference(a: Table, b: Table, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
                       ) -> dict[str, Estimate]:
    """a − b per category and overall: both arms' seeds resampled apart, the prompts together (both arms answered
    the same prompts, so prompt difficulty cancels)."""
    draws = _draws([a, b], resamples, seed)
    out = {c: _estimate(np.nanmean(a[c]) - np.nanmean(b[c]), d[0] - d[1]) for c, d in draws.items()}
    overall = np.mean([d[0] - d[1] for d in draws.values()], axis=0)
    mean = np.mean([np.nanmean(a[c]) - np.nanmean(b[c]) for c in draws])
    out["overall"] = _estimate(float(mean), overall)
    return out


def seed_means(table: Table) -> list[float]:
    """Each seed's overall adherence (mean of its category means)."""
    return [float(np.mean([table[c][k].mean() for c in table])) for k in range(next(iter(table.values())).shape[0])]


def stack(tables: list[Table]) -> Table:
    """One-seed tables → one table, a row per seed."""
    return {c: np.concatenate([t[c] for t in tables]) for c in tables[0] if all(c in t for t in tables)}
