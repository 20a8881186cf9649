"""The numbers and pictures of `lensforge ablate caption-density` (pipelines/ablate.py), from what the runs wrote.

    OUT/results.csv    one row per (variant, prompt set): words/caption, final val loss, overall and per-category
                       adherence with 95 % CI, chance, per-seed overall
    OUT/results.md     the same as tables; OUT/README.md: the command and a reading that states numbers
    OUT/adherence.png  per category per variant, CI error bars, chance as black ticks (dense and own-style prompts)
    OUT/val_loss.png   validation loss against step, one line per run
    OUT/words.png      words per caption per variant (mean ± std over the training captions)
    OUT/sweep.png      with --sweep-words: overall adherence against words per caption

Seeds are pooled: a variant's items from all seeds are bootstrapped together (scenes.adherence_report), so an
interval covers the prompts' sampling, not the seed-to-seed spread, which the tables give separately. The chance
level is recomputed per run from the stored items exactly as `scenes.adherence.score` does (each image against the
other prompts of its category), then pooled the same way.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scenes.adherence import CATEGORIES, passes
from scenes.adherence_report import Result, summarize
from scenes.scene import Scene

PROMPT_SETS = ("dense", "own")


@dataclass
class Scores:
    """One variant's evaluation on one prompt set, seeds pooled."""

    style: str
    result: Result
    per_seed: list[float]  # overall adherence of each seed's model


@dataclass
class Row:
    variant: str
    mix: dict[str, float]
    words: float
    val: list[list[tuple[int, float]]]  # per seed: (step, val_loss)
    missing: list[int] = field(default_factory=list)  # seeds whose runs are not evaluated (yet)
    scores: dict[str, Scores] = field(default_factory=dict)

    @property
    def final_val(self) -> float | None:
        last = [curve[-1][1] for curve in self.val if curve]
        return float(np.mean(last)) if last else None


def item_values(record: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Per category: each item's pass (0/1) and its chance value (its image against the category's other prompts)."""
    items = record["items"]
    targets = [Scene.from_dict(it["target"]) for it in items]
    parsed = [Scene.from_dict(it["parsed"]) for it in items]
    hits, chance = {}, {}
    for category in CATEGORIES:
        index = [i for i, it in enumerate(items) if it["category"] == category]
        if not index:
            continue
        hits[category] = np.array([items[i]["passed"] for i in index], dtype=np.float64)
        chance[category] = np.array([np.mean([passes(category, targets[j], parsed[i]) for j in index if j != i])
                                     for i in index]) if len(index) > 1 else None
    return hits, chance


def pooled(records: list[dict]) -> Result:
    """One Result over several runs' items (category by category, in run order)."""
    hits: dict[str, list] = {}
    chance: dict[str, list | None] = {}
    for record in records:
        h, c = item_values(record)
        for category, values in h.items():
            hits.setdefault(category, []).append(values)
            chance.setdefault(category, []).append(c[category])
    chance_cat = {k: None if any(v is None for v in vs) else np.concatenate(vs) for k, vs in chance.items()}
    return summarize({k: np.concatenate(vs) for k, vs in hits.items()}, chance_cat, ())


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


def collect(out: Path, variants: list, seeds: list[int], words: dict[str, dict]) -> list[Row]:
    from pipelines.ablate_data import mix_words

    rows = []
    for variant in variants:
        runs = [variant.run_dir(out, seed) for seed in seeds]
        row = Row(variant.name, variant.mix, mix_words(words, variant.mix), [val_curve(r) for r in runs],
                  [seed for seed, r in zip(seeds, runs) if not (r / "adherence-dense.json").is_file()])
        for name in PROMPT_SETS:
            records = [json.loads(p.read_text()) for r in runs if (p := r / f"adherence-{name}.json").is_file()]
            if records:
                s = records[0]["settings"]
                style = s["style"] + ("" if s.get("words") is None else f"@{s['words']}")
                row.scores[name] = Scores(style, pooled(records), [r["overall"]["mean"] for r in records])
        rows.append(row)
    return rows


# --- tables ---------------------------------------------------------------------------------------------------


def _ci(e) -> str:
    return "–" if e is None else e.text(2)


def _num(x, digits: int = 4):
    return "" if x is None else round(float(x), digits)


def write_csv(path: Path, rows: list[Row], steps: int) -> None:
    head = ["variant", "captions", "words_per_caption", "seeds", "steps", "final_val_loss", "prompts",
            "prompt_style", "n", "overall", "overall_low", "overall_high", "chance", "chance_low", "chance_high",
            "seed_overall"]
    for c in CATEGORIES:
        head += [c, f"{c}_low", f"{c}_high", f"{c}_chance"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for row in rows:
            for name, sc in row.scores.items():
                r = sc.result
                line = [row.variant, json.dumps(row.mix), _num(row.words, 3), len(row.val), steps,
                        _num(row.final_val), name, sc.style, sum(c.n for c in r.categories), _num(r.overall.mean),
                        _num(r.overall.low), _num(r.overall.high), _num(r.chance and r.chance.mean),
                        _num(r.chance and r.chance.low), _num(r.chance and r.chance.high),
                        ";".join(f"{x:.4f}" for x in sc.per_seed)]
                for c in CATEGORIES:
                    cat = next((k for k in r.categories if k.category == c), None)
                    line += ["", "", "", ""] if cat is None else [
                        _num(cat.score.mean), _num(cat.score.low), _num(cat.score.high),
                        _num(cat.chance and cat.chance.mean)]
                w.writerow(line)


def markdown(rows: list[Row], settings) -> str:
    lines = ["# Caption-density ablation\n",
             f"{len(rows)} variants × {settings.seeds} seed(s), {settings.steps} steps each; "
             f"{settings.per_category} prompts per category × {len(CATEGORIES)} categories per evaluation, "
             f"{settings.sample_steps} sampling steps, CFG {settings.cfg}, {settings.size}². Adherence: mean "
             "(95 % bootstrap CI over prompts, seeds pooled); chance: the same images scored against shuffled "
             "prompts. Validation loss: each model on the held-out images with its own main caption variant.\n",
             "| variant | words/caption | final val loss | dense prompts | chance | own-style prompts | adherence "
             "| chance | per-seed overall (dense) |",
             "|---|---:|---:|---|---|---|---|---|---|"]
    for row in rows:
        d, o = row.scores.get("dense"), row.scores.get("own")
        val = "–" if row.final_val is None else f"{row.final_val:.4f}"
        lines.append(
            f"| {row.variant} | {row.words:.1f} | {val} | {_ci(d and d.result.overall)} | "
            f"{_ci(d and d.result.chance)} | {o.style if o else '(dense)'} | {_ci(o and o.result.overall)} | "
            f"{_ci(o and o.result.chance)} | {', '.join(f'{x:.2f}' for x in d.per_seed) if d else '–'} |")
    for name, title in (("dense", "dense prompts"), ("own", "own-style prompts")):
        have = [r for r in rows if name in r.scores]
        if not have:
            continue
        lines += ["", f"## Per category, {title}", "",
                  "| variant | prompts | " + " | ".join(CATEGORIES) + " | overall |",
                  "|---|---|" + "---|" * (len(CATEGORIES) + 1)]
        for row in have:
            r = row.scores[name].result
            cells = [_ci(next((k.score for k in r.categories if k.category == c), None)) for c in CATEGORIES]
            lines.append(f"| {row.variant} | {row.scores[name].style} | {' | '.join(cells)} | "
                         f"**{r.overall.text(2)}** |")
    return "\n".join(lines) + "\n"


def reading(rows: list[Row]) -> list[str]:
    """Sentences that state the numbers: ranking, gaps with whether the intervals overlap, the largest
    per-category gap, words per caption and final validation loss."""
    out = []
    missing = [f"{r.variant} (seed {', '.join(map(str, r.missing))})" for r in rows if r.missing]
    if missing:
        out.append("Not evaluated yet, left out of every number below: " + ", ".join(missing) + ".")
    dense = sorted((r for r in rows if "dense" in r.scores), key=lambda r: -r.scores["dense"].result.overall.mean)
    if dense:
        chances = [r.scores["dense"].result.chance for r in dense if r.scores["dense"].result.chance]
        span = f"; chance {min(c.mean for c in chances):.2f}–{max(c.mean for c in chances):.2f}" if chances else ""
        out.append("On dense prompts, overall adherence: " + ", ".join(
            f"{r.variant} {r.scores['dense'].result.overall.text(2)}" for r in dense) + span + ".")
        top = dense[0].scores["dense"].result.overall
        for r in dense[1:]:
            e = r.scores["dense"].result.overall
            overlap = "overlap" if e.high >= top.low else "do not overlap"
            out.append(f"{dense[0].variant} − {r.variant}: {top.mean - e.mean:+.2f} (the 95 % intervals {overlap}).")
        if len(dense) > 1:
            gaps = []
            for c in CATEGORIES:
                vals = [(r.scores["dense"].result.category(c).score.mean, r.variant) for r in dense
                        if c in {k.category for k in r.scores["dense"].result.categories}]
                if len(vals) > 1:
                    gaps.append((max(vals)[0] - min(vals)[0], c, max(vals), min(vals)))
            if gaps:
                gap, c, hi, lo = max(gaps)
                out.append(f"Largest per-category gap on dense prompts: {c}, {hi[1]} {hi[0]:.2f} vs {lo[1]} "
                           f"{lo[0]:.2f} ({gap:+.2f}).")
    own = [r for r in rows if "own" in r.scores]
    if own:
        out.append("On their own caption style's prompts: " + ", ".join(
            f"{r.variant} ({r.scores['own'].style}) {r.scores['own'].result.overall.text(2)}" for r in own) + ".")
    out.append("Words per caption: " + ", ".join(f"{r.variant} {r.words:.1f}" for r in rows) + ".")
    vals = [r for r in rows if r.final_val is not None]
    if vals:
        out.append("Final validation loss (own captions): " + ", ".join(
            f"{r.variant} {r.final_val:.4f}" for r in vals) + ".")
    spread = [r for r in dense if len(r.scores["dense"].per_seed) > 1]
    if spread:
        out.append("Seed-to-seed range of overall (dense prompts): " + ", ".join(
            f"{r.variant} {min(r.scores['dense'].per_seed):.2f}–{max(r.scores['dense'].per_seed):.2f}"
            for r in spread) + ".")
    return out


# --- plots ----------------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    fig.clear()


def _colors(rows: list[Row]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {r.variant: cmap(i % 10) for i, r in enumerate(rows)}


def plot_adherence(path: Path, rows: list[Row]) -> None:
    from common.html import new_figure

    sets = [name for name in PROMPT_SETS if any(name in r.scores for r in rows)]
    fig = new_figure(10, 3.4 * len(sets))
    colors, labels = _colors(rows), [*CATEGORIES, "overall"]
    width = 0.8 / max(len(rows), 1)
    for k, name in enumerate(sets):
        ax = fig.add_subplot(len(sets), 1, k + 1)
        for i, row in enumerate(rows):
            sc = row.scores.get(name)
            if sc is None:
                continue
            r, x = sc.result, np.arange(len(labels)) + (i - (len(rows) - 1) / 2) * width
            est = [r.category(c).score if c in {q.category for q in r.categories} else None for c in CATEGORIES]
            est.append(r.overall)
            mean = np.array([np.nan if e is None else e.mean for e in est])
            err = np.array([[0, 0] if e is None else [e.mean - e.low, e.high - e.mean] for e in est]).T
            ax.bar(x, mean, width, yerr=err, capsize=2, color=colors[row.variant],
                   label=row.variant if name == "dense" else f"{row.variant} ({sc.style})")
            ch = [r.category(c).chance if c in {q.category for q in r.categories} else None for c in CATEGORIES]
            ch.append(r.chance)
            ax.scatter(x, [np.nan if e is None else e.mean for e in ch], marker="_", color="black", s=60, zorder=3)
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("adherence")
        ax.set_title(f"{'dense' if name == 'dense' else 'own-style'} prompts (95 % CI; black tick: chance)",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(rows), 4))
    _save(fig, path)


def plot_val_loss(path: Path, rows: list[Row]) -> None:
    from common.html import new_figure

    fig = new_figure(7, 3.5)
    ax, colors = fig.gca(), _colors(rows)
    for row in rows:
        for k, curve in enumerate(row.val):
            if curve:
                steps, loss = zip(*curve)
                ax.plot(steps, loss, marker=".", color=colors[row.variant], alpha=0.9 if k == 0 else 0.5,
                        label=row.variant if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (own captions)")
    ax.set_yscale("log")
    if any(curve for row in rows for curve in row.val):
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_words(path: Path, rows: list[Row], words: dict[str, dict]) -> None:
    from common.html import new_figure

    fig = new_figure(max(5, 1.1 * len(rows)), 3.2)
    ax, colors = fig.gca(), _colors(rows)
    # A mix's spread also holds the gap between its parts' means: shown without one.
    std = [words[next(iter(r.mix))]["std"] if len(r.mix) == 1 else 0.0 for r in rows]
    ax.bar([r.variant for r in rows], [r.words for r in rows], yerr=std, capsize=3,
           color=[colors[r.variant] for r in rows])
    ax.set_ylabel("words per caption (mean ± std)")
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    _save(fig, path)


def plot_sweep(path: Path, rows: list[Row], sweep_base: str, sweep_names: list[str]) -> None:
    """Overall adherence against words per caption: the sweep (with its uncut base) as lines, on dense prompts and
    on each model's own prompts (the dense prompt cut to its N words); the other variants as labelled points."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from common.html import new_figure

    fig = new_figure(7, 3.8)
    ax = fig.gca()
    line = sorted((r for r in rows if (r.variant in sweep_names or r.variant == sweep_base) and "dense" in r.scores),
                  key=lambda r: r.words)
    for name, fmt in (("dense", "-o"), ("own", "--s")):
        est = [(r.scores.get(name) or r.scores["dense"]).result.overall for r in line]  # uncut: own = dense
        if est:
            ax.errorbar([r.words for r in line], [e.mean for e in est], fmt=fmt, capsize=3, label=f"{name} prompts",
                        yerr=np.array([[e.mean - e.low, e.high - e.mean] for e in est]).T)
    for r in line:
        ax.annotate(r.variant, (r.words, r.scores["dense"].result.overall.mean), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    on_line = {r.variant for r in line}
    for r in rows:
        if r.variant not in on_line and "dense" in r.scores:
            e = r.scores["dense"].result.overall
            ax.errorbar([r.words], [e.mean], yerr=[[e.mean - e.low], [e.high - e.mean]], fmt="x", color="gray",
                        capsize=3)
            ax.annotate(f"{r.variant} (dense prompts)", (r.words, e.mean), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({round(r.words, 1) for r in rows}))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("words per caption (training captions, mean)")
    ax.set_ylabel("overall adherence (95 % CI)")
    ax.set_ylim(-0.02, 1.05)
    if line:
        ax.legend(fontsize=8)
    _save(fig, path)


# --- all of it ------------------------------------------------------------------------------------------------


def write_report(out: Path, settings, variants: list, seeds: list[int], words: dict[str, dict], command: str) -> Path:
    from training.caption_variants import truncated

    rows = collect(out, variants, seeds, words)
    write_csv(out / "results.csv", rows, settings.steps)
    table = markdown(rows, settings)
    (out / "results.md").write_text(table)
    plot_adherence(out / "adherence.png", rows)
    plot_val_loss(out / "val_loss.png", rows)
    plot_words(out / "words.png", rows, words)
    pictures = ["adherence.png", "val_loss.png", "words.png"]
    if settings.sweep_words:
        plot_sweep(out / "sweep.png", rows, settings.sweep_base,
                   [truncated(settings.sweep_base, n) for n in settings.sweep_words])
        pictures.append("sweep.png")
    text = ["# Caption-density ablation", "", "Command (rerun it to finish or extend the same study):", "",
            f"    {command}", "", "## Reading", "", *(f"- {s}" for s in reading(rows)), "",
            "Numbers only: an interval is over the prompts, seeds pooled" + (
                "; with one seed nothing here measures training noise." if len(seeds) == 1 else
                ", so it leaves out training noise: compare the seed-to-seed range."),
            "", "## Results", "", table.split("\n", 2)[2], "## Pictures", "",
            *(f"![{p}]({p})" for p in pictures), ""]
    (out / "README.md").write_text("\n".join(text))
    print(f"ablate: results in {out / 'results.md'}, {out / 'results.csv'}; pictures {', '.join(pictures)}")
    return out / "README.md"
