"""Lens-Turbo on the synthetic scenes: a 4-step student without CFG against its teacher, and the loss ablations.

    .venv/bin/python -m bench.distill --teacher demo-out/run --data demo-out/data --out bench-out/distill
    .venv/bin/python -m bench.distill ... --variants full            # the recipe only (≈ 20 min on 2 cores)
    .venv/bin/python -m bench.distill ... --quick                    # smoke test of this script, ≈ 1 min

1. `lensforge distill --teacher T --config docs/distill/tiny.yaml` once per variant, each from the same seed (the
   same batches and noise): `full` (DMD + the decoupled CFG term + GAN, Lens-Turbo's recipe), `dmd+ca` (no GAN),
   `dmd` (DMD alone against the conditional teacher: no CFG term, no GAN, no fake-score EMA). Resumed when
   interrupted, skipped when finished.
2. `lensforge evaluate` (bootstrap 95 % intervals, the shuffled-prompt chance level) of the teacher at 25 steps with
   CFG (its demo setting), the teacher at 4 steps with CFG, and every student at its own defaults (4 steps, CFG 1).
   Seconds per image are evaluate's sampling time over its prompts; denoiser passes per image are steps × 2 with
   CFG, steps without: the compute the goal counts, whatever the machine.
3. The same evaluation of every checkpoint the last variant kept: its trajectory (OUT/trajectory.png).
4. OUT/distill.json and OUT/distill.md (the tables), OUT/grids/<model>.png (evaluate's color_attribution samples),
   and rows for BENCHMARKS.md in $LENSFORGE_BENCH_JSON: the student's adherence over the teacher's 25-step one
   (goal ≥ 0.9), its denoiser passes over the teacher's (goal ≤ 0.1), and over the 4-step teacher (goal > 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/distill.py`
from bench.finetune import lensforge  # noqa: E402
from bench.report import emit, row  # noqa: E402

CONFIG = REPO / "docs" / "distill" / "tiny.yaml"
VARIANTS = {  # name → --set overrides over the config (the ablation ladder)
    "dmd": ["distill.losses.ca=0", "distill.losses.gan=0", "distill.fake.ema=0"],
    "dmd+ca": ["distill.losses.gan=0"],
    "full": [],
}
TEACHER_SETTINGS = {"teacher-25": (25, 4.0), "teacher-4": (4, 4.0)}  # name → (steps, CFG): the demo's guidance
GRID = "color_attribution"  # the category whose samples go to OUT/grids: several objects, colours and places
QUICK = ["distill.max_steps=2", "distill.data.batch_size=4", "distill.fake.updates=1", "distill.sample.every=0",
         "distill.checkpoint_every=2"]


def distill(name: str, args, out: Path) -> dict:
    """The variant's run (resumed or skipped as needed) and its training figures from metrics.jsonl."""
    run = out / "runs" / name
    sets = VARIANTS[name] + (QUICK if args.quick else [])
    cmd = ["distill", "--teacher", str(args.teacher), "--data", str(args.data), "--out", str(run), "--config",
           str(args.config), "--resume", "--set", "distill.progress=false"]
    for setting in sets:
        cmd += ["--set", setting]
    lensforge(cmd, out / "logs" / f"distill-{name}.log", tag="distill bench")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}  # the last record of a replayed step
    return {"run": str(run), "steps": max(train), "step_s": statistics.median(r["step_s"] for r in train.values()),
            "overrides": sets}


def evaluated(name: str, source: Path, per_category: int, out: Path, steps: int | None = None,
              cfg: float | None = None, tag: str = "distill bench") -> dict:
    """adherence.json of `lensforge evaluate` of a run (or with `source` a step directory, of that checkpoint),
    made once per name and kept (OUT/eval/<name>-<per_category>/, its path under "where")."""
    where = out / "eval" / f"{name}-{per_category}"
    flags = ["--steps", str(steps), "--cfg", str(cfg)] if steps is not None else []
    if not (where / "adherence.json").is_file():
        which = "--checkpoint" if source.name.startswith("step_") else "--run"
        lensforge(["evaluate", which, str(source), "--out", str(where), "--per-category", str(per_category),
                   *flags], out / "logs" / f"evaluate-{name}.log", tag=tag)
    return {**json.loads((where / "adherence.json").read_text()), "where": str(where)}


def evaluate(name: str, source: Path, args, out: Path, steps: int | None = None, cfg: float | None = None,
             grid: bool = True) -> dict:
    """The figures of `evaluated`: adherence, chance, categories, denoiser passes and seconds per image."""
    result = evaluated(name, source, args.per_category, out, steps, cfg)
    where = Path(result["where"])
    s = result["settings"]
    n = len(result["items"])
    if grid:
        (out / "grids").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(where / f"samples_{GRID}.png", out / "grids" / f"{name}.png")
    return {"adherence": result["overall"], "chance": result["chance"], "steps": s["steps"], "cfg": s["cfg"],
            "categories": {c: v["score"]["mean"] for c, v in result["categories"].items()},
            "passes": s["steps"] * (2 if s["cfg"] != 1 else 1), "s_per_image": s["seconds"] / n, "prompts": n}


def markdown(models: dict, runs: dict) -> str:
    base = models["teacher-25"]
    ref = base["adherence"]["mean"]
    lines = ["| model | steps | CFG | adherence (95 % CI) | × teacher-25 | denoiser passes / image | × teacher-25 | "
             "s / image (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        a, (low, high) = m["adherence"]["mean"], m["adherence"]["ci95"]
        ratio = f"{a / ref:.2f}" if ref else "—"
        lines.append(f"| {name} | {m['steps']} | {m['cfg']:g} | {a:.3f} ({low:.3f}–{high:.3f}) | {ratio} | "
                     f"{m['passes']} | {m['passes'] / base['passes']:.2f} | {m['s_per_image']:.4f} |")
    chance = base["chance"]  # None at one prompt a category (nothing to shuffle)
    if chance:
        low, high = chance["ci95"]
        lines.append(f"\nChance (shuffled prompts): {chance['mean']:.3f} ({low:.3f}–{high:.3f}).\n")
    else:
        lines.append("")
    categories = list(base["categories"])
    lines += ["| model | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m['categories'][cat]:.2f}" for cat in categories) + " |"
              for name, m in models.items()]
    lines.append("")
    for name, r in runs.items():
        lines.append(f"- `{name}`: {r['steps']} student steps, median {r['step_s']:.2f} s a step "
                     f"(≈ {r['steps'] * r['step_s'] / 60:.0f} min), overrides {r['overrides'] or 'none'}")
    return "\n".join(lines) + "\n"


def plot(trajectory: dict, models: dict, name: str, path: Path) -> None:
    """The student's adherence by step (95 % band) against the teacher at 25 and at 4 steps, and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(trajectory)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.fill_between(steps, [a["ci95"][0] for a in trajectory.values()], [a["ci95"][1] for a in trajectory.values()],
                    alpha=0.25, color="C0")
    ax.plot(steps, [a["mean"] for a in trajectory.values()], "o-", color="C0",
            label=f"student ({name}): 4 steps, no CFG")
    for label, key, color in ("teacher: 25 steps, CFG", "teacher-25", "C2"), ("teacher: 4 steps, CFG", "teacher-4",
                                                                               "C3"):
        ax.axhline(models[key]["adherence"]["mean"], color=color, linestyle="--", label=label)
    if models["teacher-25"]["chance"]:
        ax.axhline(models["teacher-25"]["chance"]["mean"], color="gray", linestyle=":", label="chance")
    ax.set_xlabel("student updates")
    ax.set_ylabel("prompt adherence")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher's run (the demo's: demo-out/run)")
    parser.add_argument("--data", type=Path, required=True, help="its DATA (the demo's: demo-out/data)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "distill")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--per-category", type=int, default=64, help="evaluate's prompts per category (64: an "
                        "overall interval of about ±0.035)")
    parser.add_argument("--quick", action="store_true", help="2 tiny steps a variant and 1 prompt a category: a "
                        "smoke test of the script, not a measurement")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.quick:
        args.per_category = 1
    out = args.out
    runs = {name: distill(name, args, out) for name in variants}
    models = {name: evaluate(name, args.teacher, args, out, steps, cfg)
              for name, (steps, cfg) in TEACHER_SETTINGS.items()}
    models.update({f"student-{name}": evaluate(f"student-{name}", Path(runs[name]["run"]), args, out)
                   for name in variants})
    last = variants[-1]  # the trajectory of the last variant (the recipe): each checkpoint it kept
    from training.train_checkpoint import complete_checkpoints

    trajectory = {int(step.name[5:]): evaluate(f"{last}-{step.name}", step, args, out, grid=False)["adherence"]
                  for step in complete_checkpoints(runs[last]["run"])}
    table = markdown(models, runs) + "\n" + "\n".join(
        [f"Student `{last}` by step (EMA weights, 4 steps, no CFG):\n", "| step | adherence (95 % CI) |", "|---|---|"]
        + [f"| {k} | {a['mean']:.3f} ({a['ci95'][0]:.3f}–{a['ci95'][1]:.3f}) |" for k, a in trajectory.items()]) + "\n"
    (out / "distill.md").write_text(table)
    plot(trajectory, models, last, out / "trajectory.png")
    (out / "distill.json").write_text(json.dumps({"models": models, "runs": runs, "trajectory": trajectory},
                                                 indent=1) + "\n")
    print(table)
    base, four = models["teacher-25"], models["teacher-4"]
    rows = []
    for name in variants:
        m = models[f"student-{name}"]
        low, high = m["adherence"]["ci95"]
        rows += [row("distill", f"student ({name}) adherence at 4 steps, no CFG / teacher's at 25 with CFG",
                     m["adherence"]["mean"], "score", peer=base["adherence"]["mean"], peer_name="teacher-25",
                     goal=">= 0.9", note=f"95 % CI {low:.3f}–{high:.3f}"),
                 row("distill", f"student ({name}) adherence / the teacher's at 4 steps with CFG",
                     m["adherence"]["mean"], "score", peer=four["adherence"]["mean"], peer_name="teacher-4",
                     goal="> 1")]
    rows.append(row("distill", "student denoiser passes per image / teacher-25's", models[f"student-{variants[-1]}"]
                    ["passes"], "passes", peer=base["passes"], peer_name="teacher-25 (25 steps × 2 with CFG)",
                    goal="<= 0.1"))
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
