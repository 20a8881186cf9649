"""The numbers of `lensforge ablate caption-density` (pipelines/ablate.py), from what the runs wrote.

    OUT/results.csv    one row per (arm, prompt set): words/caption, seeds, training seconds, final val loss (dense
                       captions), overall and per-category adherence with 95 % CI, chance, per-seed overall
    OUT/results.md     the tables: arms × prompt styles, paired differences, per category, time-matched, sweep
    OUT/README.md      the command, a reading that states the numbers, the tables, the pictures
    OUT/*.png          pipelines/ablate_plots.py

Intervals come from the bootstrap over seeds and prompts together (pipelines/ablate_stats.py). The time-matched
view: per seed, T = the fastest arm's training seconds; every slower arm's dense-prompt adherence at its checkpoint
nearest T (one every --time-every steps), the fastest arm's at its end; then bootstrapped the same way.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines import ablate_stats as stats
from scenes.adherence import ALL_CATEGORIES
from scenes.adherence_report import Estimate

# Differences read on every prompt style, when both arms exist: Lens Fig. 4's ordering first.
PAIRS = (("dense", "mixed"), ("mixed", "short"), ("dense", "short"), ("dense", "alt"), ("random-length", "dense"),
         ("random-length", "mixed"))


@dataclass
class Row:
    variant: str
    mix: dict[str, float]
    sweep: bool
    words: float
    seeds: list[int]
    val: dict[int, list[tuple[int, float]]]  # seed → (step, val loss on dense captions)
    clock: dict[int, dict[int, float]]  # seed → step → training seconds
    seconds: dict[int, float]  # seed → training seconds of the whole run
    tables: dict[str, tuple[stats.Table, stats.Table, list[int], str]] = field(default_factory=dict)
    # prompt set → (pass table, chance table, its seeds, style label)
    points: dict[int, tuple[int, float, stats.Table]] = field(default_factory=dict)
    # seed → (step, time limit, one-seed dense table) of the time-matched evaluation
    _estimates: dict[str, dict[str, Estimate]] = field(default_factory=dict, repr=False)

    @property
    def final_val(self) -> float | None:
        last = [curve[-1][1] for curve in self.val.values() if curve]
        return float(np.mean(last)) if last else None

    @property
    def median_seconds(self) -> float | None:
        return float(np.median(list(self.seconds.values()))) if self.seconds else None

    def estimate(self, name: str) -> dict[str, Estimate] | None:
        if name not in self.tables:
            return None
        if name not in self._estimates:  # a report reads each several times; the bootstrap is seeded
            self._estimates[name] = stats.crossed(self.tables[name][0])
        return self._estimates[name]

    def above_chance(self, name: str) -> Estimate | None:
        """Adherence minus chance, item by item, bootstrapped like adherence: what the captions bought beyond what
        the images pass against any prompt of their category (noise that paints every cell passes position)."""
        if name not in self.tables:
            return None
        key = f"{name}-above-chance"
        if key not in self._estimates:
            hits, chance = self.tables[name][:2]
            self._estimates[key] = stats.crossed({c: hits[c] - chance[c] for c in hits})
        return self._estimates[key]["overall"]

    def chance(self, name: str) -> float:
        """The chance level of a prompt set, overall: its images scored against their category's other prompts
        (mean of category means). It differs per arm: a model that paints every cell passes position anyway."""
        chance = self.tables[name][1]
        return float(np.mean([np.nanmean(chance[c]) for c in chance]))


def val_curve(run: Path) -> list[tuple[int, float]]:
    """(step, val_loss) from RUN/metrics.jsonl, the last record of a step winning (a resumed run repeats steps)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    points = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "val":
            points[record["step"]] = record["val_loss"]
    return sorted(points.items())


def arm_words(words: dict[str, dict], mix: dict[str, float]) -> float:
    """Expected words per training caption of a mix (a random cut of n words keeps (n + 1) / 2 on average)."""
    from training.caption_variants import random_base

    total = sum(mix.values())
    return sum(p / total * ((words[random_base(v)]["mean"] + 1) / 2 if random_base(v) else words[v]["mean"])
               for v, p in mix.items())


def _style(settings: dict) -> str:
    if settings.get("own"):
        return "+".join(f"{s}{'' if c is None else f'@{c}'}" for s, c, _ in settings["own"])
    return settings["style"] + ("" if settings.get("words") is None else f"@{settings['words']}")


def collect(out: Path, variants: list, s, base_seed: int, words: dict[str, dict]) -> list[Row]:
    from pipelines.ablate import run_seeds, train_seconds, trained

    rows = []
    for variant in variants:
        seeds = run_seeds(variant, s, base_seed)
        runs = {seed: variant.run_dir(out, seed) for seed in seeds}
        done = {seed: trained(run) for seed, run in runs.items()}
        row = Row(variant.name, variant.mix, variant.sweep, arm_words(words, variant.mix), seeds,
                  {seed: val_curve(r) for seed, r in runs.items()},
                  {seed: train_seconds(r) for seed, r in runs.items()},
                  {seed: d["seconds"] for seed, d in done.items() if d and d.get("seconds") is not None})
        for name in variant.prompt_sets():
            found = [(seed, json.loads(p.read_text())) for seed, r in runs.items()
                     if (p := r / f"adherence-{name}.json").is_file()]
            if found:
                hits, chance = stats.item_table([rec for _, rec in found])
                row.tables[name] = (hits, chance, [seed for seed, _ in found], _style(found[0][1]["settings"]))
        for seed, run in runs.items():
            for path in sorted(run.glob("adherence-dense-step*.json")):
                record = json.loads(path.read_text())
                row.points[seed] = (record["settings"]["step"], record["settings"]["time_limit"],
                                    stats.item_table([record])[0])
        rows.append(row)
    return rows


# --- derived views ------------------------------------------------------------------------------------------------


def time_matched(rows: list[Row]) -> tuple[float | None, dict[str, tuple[float, dict[str, Estimate]] | None]]:
    """T (the median over seeds of the fastest arm's training seconds) and, per arm, (mean step it was read at,
    dense-prompt adherence at T): per seed the checkpoint nearest T (pipelines/ablate_eval.py), or the last one
    for the seed's fastest arm; None for an arm with no seed read yet."""
    arms = [r for r in rows if not r.sweep and r.seconds]
    limits = {}
    for seed in {seed for r in arms for seed in r.seconds}:
        times = [r.seconds.get(seed) for r in arms]
        if all(t is not None for t in times):
            limits[seed] = min(times)
    if not limits:
        return None, {}
    out: dict[str, tuple[float, dict[str, Estimate]] | None] = {}
    for row in arms:
        tables, steps = [], []
        for seed, limit in limits.items():
            if seed in row.points and row.points[seed][1] == limit:
                steps.append(row.points[seed][0])
                tables.append(row.points[seed][2])
            elif row.seconds.get(seed) == limit and "dense" in row.tables and seed in row.tables["dense"][2]:
                k = row.tables["dense"][2].index(seed)
                steps.append(max(row.clock.get(seed, {0: 0})))
                tables.append({c: t[k:k + 1] for c, t in row.tables["dense"][0].items()})
        out[row.variant] = (float(np.mean(steps)), stats.crossed(stats.stack(tables))) if tables else None
    return float(np.median(list(limits.values()))), out


def differences(rows: list[Row], name: str) -> list[tuple[str, str, dict[str, Estimate]]]:
    by = {r.variant: r for r in rows if name in r.tables}
    return [(a, b, stats.crossed_difference(by[a].tables[name][0], by[b].tables[name][0]))
            for a, b in PAIRS if a in by and b in by]


# --- tables ---------------------------------------------------------------------------------------------------


def _ci(e: Estimate | None, digits: int = 2) -> str:
    return "–" if e is None else e.text(digits)


def _signed(e: Estimate, digits: int = 3) -> str:
    return f"{e.mean:+.{digits}f} ({e.low:+.{digits}f} to {e.high:+.{digits}f})"


def write_csv(path: Path, rows: list[Row], steps: int) -> None:
    head = ["variant", "captions", "words_per_caption", "seeds", "steps", "train_seconds", "final_val_loss_dense",
            "prompts", "prompt_style", "n", "overall", "overall_low", "overall_high", "chance", "seed_overall"]
    for c in ALL_CATEGORIES:
        head += [c, f"{c}_low", f"{c}_high"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in rows:
            for name, (hits, chance, seeds, style) in row.tables.items():
                est = row.estimate(name)
                line = [row.variant, json.dumps(row.mix), round(row.words, 2), len(seeds), steps,
                        row.median_seconds and round(row.median_seconds, 1), row.final_val and round(row.final_val, 5),
                        name, style, int(sum(h.size for h in hits.values())), round(est["overall"].mean, 4),
                        round(est["overall"].low, 4), round(est["overall"].high, 4),
                        round(row.chance(name), 4),
                        ";".join(f"{x:.4f}" for x in stats.seed_means(hits))]
                for c in ALL_CATEGORIES:
                    line += ["", "", ""] if c not in est else [round(est[c].mean, 4), round(est[c].low, 4),
                                                               round(est[c].high, 4)]
                w.writerow(line)


def markdown(rows: list[Row], s) -> str:
    arms = [r for r in rows if not r.sweep]
    sets = [n for n in ("dense", "short", "own") if any(n in r.tables for r in arms)]
    lines = ["# Caption-density ablation\n",
             f"{len(arms)} arms × {s.seeds} seed(s), {s.steps} steps each ({s.world} scenes); {s.per_category} "
             f"prompts per category per evaluation, {s.sample_steps} sampling steps, CFG {s.cfg:g}, {s.size}². "
             "Adherence: mean (95 % interval, bootstrap over seeds and prompts together). Validation loss: every "
             "model on the same held-out images with dense captions. Training time: the trainer's step time summed "
             "(median over seeds). Each adherence cell: mean (95 % interval) / chance, the same images scored "
             "against their category's other prompts.\n",
             "| arm | words/caption | seeds | training s | final val loss | " + " | ".join(
                 f"{n} prompts" for n in sets) + " | dense, above chance | per-seed (dense) |",
             "|---|---:|---:|---:|---:|" + "---|" * len(sets) + "---|---|"]
    for r in arms:
        cells = []
        for n in sets:
            e = r.estimate(n)
            cells.append("–" if e is None else f"{_ci(e['overall'])} / {r.chance(n):.2f}"
                         + (f" [{r.tables[n][3]}]" if n == "own" else ""))
        dense = r.tables.get("dense")
        per_seed = "–" if dense is None else ", ".join(f"{x:.2f}" for x in stats.seed_means(dense[0]))
        lines.append(f"| {r.variant} | {r.words:.1f} | {len(r.tables.get('dense', (0, 0, []))[2])} | "
                     f"{'–' if r.median_seconds is None else f'{r.median_seconds:.0f}'} | "
                     f"{'–' if r.final_val is None else f'{r.final_val:.4f}'} | {' | '.join(cells)} | "
                     f"{_signed(r.above_chance('dense'), 2) if 'dense' in r.tables else '–'} | {per_seed} |")
    for n in sets[:2]:
        diffs = differences(arms, n)
        if diffs:
            lines += ["", f"## Differences, {n} prompts (paired over prompts, seeds resampled per arm)", "",
                      "| difference | overall (95 % interval) |", "|---|---|"]
            lines += [f"| {a} − {b} | {_signed(d['overall'])} |" for a, b, d in diffs]
    have = [r for r in arms if "dense" in r.tables]
    if have:
        cats = [c for c in ALL_CATEGORIES if c in have[0].tables["dense"][0]]
        lines += ["", "## Per category, dense prompts", "", "| arm | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats)]
        for r in have:
            e = r.estimate("dense")
            lines.append(f"| {r.variant} | " + " | ".join(_ci(e.get(c)) for c in cats) + " |")
    limit, matched = time_matched(rows)
    if limit is not None:
        lines += ["", f"## Time-matched, dense prompts: every arm at {limit:.0f} s of training (the fastest "
                  "arm's; median over seeds)",
                  "", "| arm | steps by then | adherence |", "|---|---:|---|"]
        for name, got in matched.items():
            lines.append(f"| {name} | – | – |" if got is None else
                         f"| {name} | {got[0]:.0f} | {_ci(got[1]['overall'])} |")
    sweep = sorted((r for r in rows if (r.sweep or r.variant == s.sweep_base) and "dense" in r.tables),
                   key=lambda r: r.words)
    if s.sweep_words and sweep:
        lines += ["", f"## Length sweep: {s.sweep_base} cut to N words (seed {sweep[0].seeds[0]})", "",
                  "| variant | words/caption | dense prompts | own prompts |", "|---|---:|---|---|"]
        for r in sweep:
            own = r.estimate("own") or r.estimate("dense")
            lines.append(f"| {r.variant} | {r.words:.1f} | {_ci(_seed_one(r, 'dense'))} | {_ci(own['overall'])} |")
    return "\n".join(lines) + "\n"


def _seed_one(row: Row, name: str) -> Estimate | None:
    """The first seed's overall on a prompt set (the sweep compares one seed each)."""
    hits = row.tables.get(name)
    if hits is None:
        return None
    return stats.crossed({c: t[:1] for c, t in hits[0].items()})["overall"]


def reading(rows: list[Row]) -> list[str]:
    """Sentences that state the numbers: the ranking per prompt style, Lens's ordering, time-matched."""
    arms = [r for r in rows if not r.sweep]
    out = []
    scored = {r.variant: r.tables.get("dense", (0, 0, []))[2] for r in arms}
    missing = [f"{r.variant} (seed {', '.join(str(x) for x in r.seeds if x not in scored[r.variant])})"
               for r in arms if len(scored[r.variant]) < len(r.seeds)]
    if missing:
        out.append("Not evaluated yet, left out of every number below: " + ", ".join(missing) + ".")
    for name in ("dense", "short"):
        ranked = sorted((r for r in arms if name in r.tables), key=lambda r: -r.estimate(name)["overall"].mean)
        if ranked:
            out.append(f"On {name} prompts (adherence, then chance): " + ", ".join(
                f"{r.variant} {_ci(r.estimate(name)['overall'])} vs {r.chance(name):.2f}" for r in ranked) + ".")
        if name == "dense" and ranked:
            above = sorted(ranked, key=lambda r: -r.above_chance(name).mean)
            out.append("Above chance on dense prompts: " + ", ".join(
                f"{r.variant} {_signed(r.above_chance(name), 2)}" for r in above) + ".")
        by = {a + "−" + b: d["overall"] for a, b, d in differences(arms, name)}
        if "dense−mixed" in by and "mixed−short" in by:
            holds = by["dense−mixed"].low > 0 and by["mixed−short"].low > 0
            out.append(f"Lens's ordering detailed > mixed > brief on {name} prompts: dense − mixed "
                       f"{_signed(by['dense−mixed'])}, mixed − short {_signed(by['mixed−short'])}: "
                       + ("it holds (both intervals above 0)." if holds else "it does not appear here (an interval "
                          "reaches 0 or below)."))
    limit, matched = time_matched(rows)
    got = {k: v for k, v in matched.items() if v is not None}
    if got:
        out.append(f"At equal training time ({limit:.0f} s): " + ", ".join(
            f"{k} {_ci(v[1]['overall'])} after {v[0]:.0f} steps" for k, v in
            sorted(got.items(), key=lambda kv: -kv[1][1]["overall"].mean)) + ".")
    return out


def write_report(out: Path, s, variants: list, base_seed: int, words: dict[str, dict], command: str) -> Path:
    from pipelines import ablate_plots as plots

    rows = collect(out, variants, s, base_seed, words)
    write_csv(out / "results.csv", rows, s.steps)
    table = markdown(rows, s)
    (out / "results.md").write_text(table)
    pictures = plots.write_all(out, rows, s)
    text = ["# Caption-density ablation", "", "Command (rerun it to finish or extend the same study):", "",
            f"    {command}", "", "## Reading", "", *(f"- {x}" for x in reading(rows)), "",
            "## Results", "", table.split("\n", 2)[2], "## Pictures", "", *(f"![{p}]({p})" for p in pictures), ""]
    (out / "README.md").write_text("\n".join(text))
    print(f"ablate: results in {out / 'results.md'}, {out / 'results.csv'}; pictures {', '.join(pictures)}")
    return out / "README.md"
