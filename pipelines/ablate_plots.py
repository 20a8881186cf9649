"""The pictures of `lensforge ablate caption-density` (rows from pipelines/ablate_report.py):

    adherence.png   overall adherence by arm, one bar per prompt style (dense, short, own), 95 % intervals over
                    seeds × prompts, chance as black ticks
    categories.png  per category on dense prompts, one bar per arm
    val_loss.png    validation loss on dense captions against step and against training seconds, a line per run
    sweep.png       with --sweep-words: adherence against words per training caption (the sweep as lines, the
                    arms as points)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import ablate_stats as stats

SETS = ("dense", "short", "own")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    fig.clear()


def _colors(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _bars(ax, x, estimates, width, color, label) -> None:
    mean = np.array([np.nan if e is None else e.mean for e in estimates])
    err = np.array([[0, 0] if e is None else [e.mean - e.low, e.high - e.mean] for e in estimates]).T
    ax.bar(x, mean, width, yerr=err, capsize=2, color=color, label=label)


def plot_adherence(path: Path, rows) -> None:
    from common.html import new_figure

    arms = [r for r in rows if not r.sweep and r.tables]
    fig = new_figure(8, 3.6)
    ax, colors = fig.gca(), _colors(list(SETS))
    width = 0.8 / len(SETS)
    for k, name in enumerate(SETS):
        x = np.arange(len(arms)) + (k - (len(SETS) - 1) / 2) * width
        est = [r.estimate(name)["overall"] if name in r.tables else None for r in arms]
        _bars(ax, x, est, width, colors[name], f"{name} prompts")
        chance = [r.chance(name) if name in r.tables else np.nan for r in arms]
        ax.scatter(x, chance, marker="_", color="black", s=60, zorder=3)
    ax.set_xticks(np.arange(len(arms)), [r.variant for r in arms], fontsize=8)
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("overall adherence")
    ax.set_title("by arm and prompt style (95 % interval over seeds × prompts; black tick: chance)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_categories(path: Path, rows) -> None:
    from common.html import new_figure

    arms = [r for r in rows if not r.sweep and "dense" in r.tables]
    cats = [c for c in arms[0].tables["dense"][0]] + ["overall"]
    fig = new_figure(11, 3.6)
    ax, colors = fig.gca(), _colors([r.variant for r in arms])
    width = 0.8 / len(arms)
    for i, r in enumerate(arms):
        est = r.estimate("dense")
        _bars(ax, np.arange(len(cats)) + (i - (len(arms) - 1) / 2) * width, [est.get(c) for c in cats], width,
              colors[r.variant], r.variant)
    ax.set_xticks(np.arange(len(cats)), cats, fontsize=7, rotation=20)
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("adherence, dense prompts")
    ax.legend(fontsize=7, ncol=min(len(arms), 5))
    _save(fig, path)


def plot_val_loss(path: Path, rows) -> None:
    from common.html import new_figure

    fig = new_figure(11, 3.6)
    by_step, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = _colors([r.variant for r in rows])
    for r in rows:
        for k, (seed, curve) in enumerate(sorted(r.val.items())):
            if not curve:
                continue
            steps, loss = zip(*curve)
            style = dict(color=colors[r.variant], alpha=0.9 if k == 0 else 0.45, label=r.variant if k == 0 else None,
                         linestyle=":" if r.sweep else "-")
            by_step.plot(steps, loss, **style)
            clock = r.clock.get(seed, {})
            timed = [(clock[s], v) for s, v in curve if s in clock]
            if timed:
                by_time.plot(*zip(*timed), **style)
    for ax, label in ((by_step, "step"), (by_time, "training seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (dense captions)")
        ax.set_yscale("log")
    by_step.legend(fontsize=7)
    _save(fig, path)


def plot_sweep(path: Path, rows, sweep_base: str) -> None:
    from common.html import new_figure

    fig = new_figure(7, 3.8)
    ax = fig.gca()
    line = sorted((r for r in rows if (r.sweep or r.variant == sweep_base) and "dense" in r.tables),
                  key=lambda r: r.words)
    for name, fmt in (("dense", "-o"), ("own", "--s")):
        est = []
        for r in line:
            table = (r.tables.get(name) or r.tables["dense"])[0]  # the uncut base: own = dense
            est.append(stats.crossed({c: t[:1] for c, t in table.items()})["overall"])  # one seed each
        ax.errorbar([r.words for r in line], [e.mean for e in est], fmt=fmt, capsize=3, label=f"{name} prompts",
                    yerr=np.array([[e.mean - e.low, e.high - e.mean] for e in est]).T)
    for r in rows:
        if not r.sweep and r.variant != sweep_base and "dense" in r.tables:
            e = r.estimate("dense")["overall"]
            ax.errorbar([r.words], [e.mean], yerr=[[e.mean - e.low], [e.high - e.mean]], fmt="x", color="gray",
                        capsize=3)
            ax.annotate(r.variant, (r.words, e.mean), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("words per training caption (mean)")
    ax.set_ylabel("overall adherence (95 % interval)")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_all(out: Path, rows, s) -> list[str]:
    """Every picture there is data for; their file names."""
    made = []
    if any(not r.sweep and r.tables for r in rows):
        plot_adherence(out / "adherence.png", rows)
        made.append("adherence.png")
    if any(not r.sweep and "dense" in r.tables for r in rows):
        plot_categories(out / "categories.png", rows)
        made.append("categories.png")
    plot_val_loss(out / "val_loss.png", rows)
    made.append("val_loss.png")
    if s.sweep_words and any(r.sweep and "dense" in r.tables for r in rows):
        plot_sweep(out / "sweep.png", rows, s.sweep_base)
        made.append("sweep.png")
    return made
