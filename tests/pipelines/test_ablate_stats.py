"""The study's intervals: the bootstrap over seeds and prompts together covers the seed-to-seed spread that a
prompt bootstrap hides, a difference is paired over prompts, one seed is the prompt bootstrap, and the
time-matched view reads every arm at the fastest arm's training time."""

import numpy as np
import pytest

from pipelines import ablate_stats as stats
from pipelines.ablate_report import Row, time_matched
from scenes.adherence_report import bootstrap


def table(*seeds: list[float], category: str = "colors") -> stats.Table:
    return {category: np.array(seeds, dtype=float)}


def test_seeds_that_disagree_widen_the_interval_a_prompt_bootstrap_keeps_narrow():
    rng = np.random.default_rng(0)
    good, bad = (rng.random(64) < 0.9).astype(float), (rng.random(64) < 0.3).astype(float)
    crossed = stats.crossed(table(good, bad))["overall"]
    pooled = bootstrap({"colors": np.concatenate([good, bad])})[1]  # prompts alone, the seeds' items pooled
    assert crossed.mean == pytest.approx(np.concatenate([good, bad]).mean())
    assert crossed.high - crossed.low > 2 * (pooled.high - pooled.low)  # training noise shows
    assert crossed.low < bad.mean() + 0.05 and crossed.high > good.mean() - 0.05


def test_one_seed_is_the_prompt_bootstrap():
    values = (np.random.default_rng(1).random(48) < 0.5).astype(float)
    est = stats.crossed(table(values))["colors"]
    prompts = bootstrap({"colors": values})[0]["colors"]
    assert est.mean == pytest.approx(values.mean())
    assert abs(est.low - prompts.low) < 0.05 and abs(est.high - prompts.high) < 0.05


def test_a_difference_is_paired_over_prompts():
    values = (np.random.default_rng(2).random(40) < 0.5).astype(float)
    same = stats.crossed_difference(table(values), table(values))["overall"]
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)  # prompt difficulty cancels
    better = np.maximum(values, (np.arange(40) % 4 == 0))
    gap = stats.crossed_difference(table(better), table(values))["overall"]
    assert gap.low > 0 and gap.mean == pytest.approx(better.mean() - values.mean())


def test_overall_is_the_mean_of_category_means():
    t = {"colors": np.ones((2, 10)), "position": np.zeros((2, 30))}
    assert stats.crossed(t)["overall"].mean == pytest.approx(0.5)
    assert stats.seed_means(t) == [0.5, 0.5]


def test_seeds_on_different_prompt_sets_are_refused():
    item = {"category": "colors", "passed": True, "target": {"objects": []}, "parsed": {"objects": []}}
    with pytest.raises(ValueError, match="different prompt sets"):
        stats.item_table([{"items": [item]}, {"items": [item, item]}])


def test_time_matched_reads_each_arm_at_the_fastest_arms_time():
    ones, zeros = table(np.ones(8)), table(np.zeros(8))

    def row(name, seconds, point, final):
        return Row(name, {name: 1.0}, False, 1.0, [0], {}, {0: {5: seconds / 2, 10: seconds}}, {0: seconds},
                   {"dense": (final, final, [0], "dense")}, {} if point is None else {0: point})

    fast = row("fast", 100.0, None, ones)  # the fastest arm: T = 100 s, read at its end
    slow = row("slow", 160.0, (5, 100.0, zeros), ones)  # read at its checkpoint nearest 100 s
    stale = row("stale", 240.0, (5, 90.0, ones), ones)  # read against another T: not this view's
    limit, got = time_matched([fast, slow, stale])
    assert limit == 100.0
    assert got["fast"][0] == 10 and got["fast"][1]["overall"].mean == 1.0
    assert got["slow"][0] == 5 and got["slow"][1]["overall"].mean == 0.0
    assert got["stale"] is None
