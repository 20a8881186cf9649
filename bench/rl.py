"""Lens-RL on the synthetic scenes: DiffusionNFT from the demo's tiny model, trained on some adherence categories
and evaluated on all of them, with the rule reward and with the rubric judge.

    .venv/bin/python -m bench.rl --init demo-out/run --out bench-out/rl          # both rewards (≈ 20 min, 2 cores)
    .venv/bin/python -m bench.rl --init demo-out/run --rewards scenes            # one (≈ 10 min)
    .venv/bin/python -m bench.rl --init demo-out/run --out bench-out/rl-lr3e-4 --set rl.optim.lr=3e-4 \
        --set rl.max_steps=200 --set rl.checkpoint_every=50                    # Lens-RL's LR, twice as long
    .venv/bin/python -m bench.rl --init demo-out/run --quick                     # smoke test of this script, ≈ 1 min

1. `lensforge scenes prompts --categories TRAIN --per-category 64 --seed 1`: the training prompts (evaluate's are
   seed 0: training never sees an evaluation prompt).
2. `lensforge evaluate` of the init with the rollouts' sampler (10 steps, no CFG: what the RL runs optimise and
   record as their default), and at the demo's own setting (25 steps, CFG 4) for reference.
3. Per reward, `lensforge rl --init INIT --prompts P --reward R --config docs/rl/tiny.yaml` (resumed when
   interrupted, skipped when finished), every run from the same seed; the judge is the local OpenAI-compatible
   endpoint, started here on loopback (`captioning.endpoint.start_endpoint`), priced as gpt-4.1-mini.
4. `lensforge evaluate` of every checkpoint each run kept (the last is the result; the others its trajectory).
5. OUT/rl.json and OUT/rl.md: adherence on the trained and on the held-out categories (the mean over those
   categories, bootstrap 95 % intervals) before and after, the change with a paired bootstrap interval (the same
   prompts and seeds before and after), every category, the judge's tokens and cost; OUT/trajectory.png;
   OUT/grids/<model>-<category>.png (evaluate's samples); rows for BENCHMARKS.md in $LENSFORGE_BENCH_JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/rl.py`
from bench.distill import evaluated  # noqa: E402
from bench.finetune import lensforge  # noqa: E402
from bench.report import emit, row  # noqa: E402

CONFIG = REPO / "docs" / "rl" / "tiny.yaml"
REWARDS = ("scenes", "judge")
TRAIN = ("single_object", "two_objects", "colors", "color_attribution")  # held out: the rest of CATEGORIES
ROLLOUT = (10, 1.0)  # (steps, CFG) of docs/rl/tiny.yaml's rollouts
DEMO = (25, 4.0)  # the demo's own sampling
JUDGE_KEY = "sk-local"
QUICK = ["rl.max_steps=2", "rl.checkpoint_every=1", "rl.rollout.prompts=2", "rl.rollout.images=2",
         "rl.rollout.steps=2", "rl.log_every=1"]


def rl_run(reward: str, args, prompts: Path, out: Path, base_url: str | None) -> dict:
    """The reward's run (resumed or skipped as needed) and its training figures from metrics.jsonl."""
    run = out / "runs" / reward
    cmd = ["rl", "--init", str(args.init), "--prompts", str(prompts), "--out", str(run), "--reward", reward,
           "--config", str(args.config), "--resume", "--set", "rl.progress=false"]
    if base_url:
        cmd += ["--base-url", base_url]
    for setting in [*args.set, *(QUICK if args.quick else [])]:
        cmd += ["--set", setting]
    os.environ.setdefault("OPENAI_API_KEY", JUDGE_KEY)  # the local endpoint takes any key
    lensforge(cmd, out / "logs" / f"rl-{reward}.log", tag="rl bench")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}  # the last record of a replayed step
    figures = {"run": str(run), "steps": max(train), "step_s": statistics.median(r["step_s"] for r in train.values()),
               "reward": {step: r["reward"] for step, r in train.items()},
               "flat": {step: r["flat"] for step, r in train.items()}}
    if reward == "judge":
        rows = [json.loads(line) for line in (run / "rl" / "judge-rank0.jsonl").read_text().splitlines()]
        figures.update(judge_usd=sum(r["usd"] for r in rows), judge_tokens=sum(r["tokens"] for r in rows),
                       judge_requests=len(rows))
    return figures


def evaluate(name: str, source: Path, args, out: Path, steps: int | None = None, cfg: float | None = None) -> dict:
    return evaluated(name, source, args.per_category, out, steps, cfg, tag="rl bench")


def passed(result: dict, categories) -> dict[str, np.ndarray]:
    """category → (n,) 0/1 per item, in evaluate's item order (the same prompts and seeds in every result)."""
    return {c: np.array([float(it["passed"]) for it in result["items"] if it["category"] == c]) for c in categories}


def split(result: dict, before: dict | None, held: tuple[str, ...]) -> dict:
    """Adherence over the trained and the held-out categories (mean of categories, 95 % CI), and with `before`
    the paired changes (per item after − before, resampled within categories): of those means, and of each
    category, where a mean over categories can hide a loss."""
    from scenes.adherence_report import bootstrap

    def interval(e) -> dict:
        return {"mean": e.mean, "ci95": [e.low, e.high]}

    categories = list(result["categories"])
    now = passed(result, categories)
    change = {c: now[c] - then for c, then in passed(before, categories).items()} if before is not None else None
    out = {}
    for name, cats in ("trained", TRAIN), ("held_out", held):
        out[name] = interval(bootstrap({c: now[c] for c in cats})[1])
        if change is not None:
            out[f"{name}_change"] = interval(bootstrap({c: change[c] for c in cats})[1])
    out["categories"] = {c: v["score"]["mean"] for c, v in result["categories"].items()}
    if change is not None:
        out["category_change"] = {c: interval(e) for c, e in bootstrap(change)[0].items()}
    return out


def ci(e: dict, signed: bool = False) -> str:
    if signed:
        return f"{e['mean']:+.3f} ({e['ci95'][0]:+.3f} to {e['ci95'][1]:+.3f})"
    return f"{e['mean']:.3f} ({e['ci95'][0]:.3f}–{e['ci95'][1]:.3f})"


def markdown(models: dict, runs: dict, held: tuple[str, ...], trajectory: dict) -> str:
    lines = ["| model | steps, CFG | trained categories (95 % CI) | change | held-out categories (95 % CI) | "
             "change |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        change = [ci(m[k], True) if k in m else "—" for k in ("trained_change", "held_out_change")]
        lines.append(f"| {name} | {m['steps']}, {m['cfg']:g} | {ci(m['trained'])} | {change[0]} | "
                     f"{ci(m['held_out'])} | {change[1]} |")
    categories = list(next(iter(models.values()))["categories"])
    marks = [f"{c}{'' if c in TRAIN else ' (held out)'}" for c in categories]
    lines += ["", "| model | " + " | ".join(marks) + " |", "|---" * (len(categories) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m['categories'][c]:.2f}" for c in categories) + " |"
              for name, m in models.items()]
    changed = {name: m for name, m in models.items() if "category_change" in m}
    if changed:
        lines += ["", "Change from the init, by category (paired 95 % CI; the same prompts and seeds):", "",
                  "| model | " + " | ".join(marks) + " |", "|---" * (len(categories) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(ci(m["category_change"][c], True) for c in categories) + " |"
                  for name, m in changed.items()]
    lines.append("")
    for reward, r in runs.items():
        cost = (f"; the judge: {r['judge_requests']:,} requests, {r['judge_tokens']:,} tokens, "
                f"${r['judge_usd']:.3f} at gpt-4.1-mini prices") if reward == "judge" else ""
        lines.append(f"- `{reward}`: {r['steps']} steps, median {r['step_s']:.2f} s a step "
                     f"(≈ {r['steps'] * r['step_s'] / 60:.0f} min){cost}")
    for reward, points in trajectory.items():
        lines += ["", f"`{reward}` by step (EMA weights, {ROLLOUT[0]} steps, no CFG):", "",
                  "| step | trained | held-out | " + " | ".join(categories) + " |",
                  "|---" * (len(categories) + 3) + "|"]
        lines += [f"| {step} | {p['trained']['mean']:.3f} | {p['held_out']['mean']:.3f} | "
                  + " | ".join(f"{p['categories'][c]:.2f}" for c in categories) + " |" for step, p in points.items()]
    return "\n".join(lines) + "\n"


def plot(runs: dict, trajectory: dict, before: dict, path: Path) -> None:
    """Left: the rollouts' mean reward by step; right: evaluated adherence, trained and held out, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for i, (reward, r) in enumerate(runs.items()):
        steps = sorted(r["reward"])
        values = np.array([r["reward"][s] for s in steps])
        left.plot(steps, values, color=f"C{i}", alpha=0.35)
        k = max(1, len(values) // 10)  # a running mean over a tenth of the run
        left.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, mode="valid"), color=f"C{i}", label=reward)
        points = {0: before, **trajectory[reward]}
        for part, style in ("trained", "o-"), ("held_out", "s--"):
            right.plot(list(points), [p[part]["mean"] for p in points.values()], style, color=f"C{i}",
                       label=f"{reward}: {part.replace('_', '-')}")
    left.set_xlabel("RL step")
    left.set_ylabel("rollouts' mean reward")
    left.legend(fontsize=8)
    right.set_xlabel("RL step")
    right.set_ylabel("prompt adherence (evaluate)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    from scenes.adherence import CATEGORIES
    from training.train_checkpoint import complete_checkpoints

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True, help="the run to post-train (the demo's: demo-out/run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "rl")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--rewards", default=",".join(REWARDS), help=f"some of {', '.join(REWARDS)}")
    parser.add_argument("--set", action="append", default=[], metavar="rl.K=V", help="an override of the config "
                        "for both runs (repeatable), e.g. rl.optim.lr=3e-4")
    parser.add_argument("--per-category", type=int, default=64, help="evaluate's prompts per category")
    parser.add_argument("--quick", action="store_true", help="2 tiny steps a reward and 2 prompts a category: a "
                        "smoke test of the script, not a measurement")
    args = parser.parse_args(argv)
    rewards = [r for r in args.rewards.split(",") if r]
    if set(rewards) - set(REWARDS):
        parser.error(f"unknown rewards {sorted(set(rewards) - set(REWARDS))}; known: {', '.join(REWARDS)}")
    if args.quick:
        args.per_category = 2
    out, held = args.out, tuple(c for c in CATEGORIES if c not in TRAIN)
    prompts = out / "prompts.jsonl"
    if not prompts.is_file():
        lensforge(["scenes", "prompts", "--out", str(prompts), "--categories", ",".join(TRAIN), "--per-category",
                   "64"], out / "logs" / "prompts.log", tag="rl bench")
    init = evaluate("init", args.init, args, out, *ROLLOUT)
    models = {"init": {**split(init, None, held), "steps": ROLLOUT[0], "cfg": ROLLOUT[1]}}
    demo = evaluate("init-demo-sampler", args.init, args, out, *DEMO)
    models["init (demo sampler)"] = {**split(demo, None, held), "steps": DEMO[0], "cfg": DEMO[1]}
    handle = None
    if "judge" in rewards:
        from captioning.endpoint import start_endpoint

        handle, base_url = start_endpoint(seed=0)
    try:
        runs = {r: rl_run(r, args, prompts, out, base_url if r == "judge" else None) for r in rewards}
    finally:
        if handle is not None:
            handle.stop()
    trajectory, grids = {}, out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for reward in rewards:
        steps = complete_checkpoints(runs[reward]["run"])
        results = {int(s.name[5:]): evaluate(f"{reward}-{s.name}", s, args, out) for s in steps}
        trajectory[reward] = {k: split(v, init, held) for k, v in results.items()}
        last = results[max(results)]
        models[f"rl-{reward}"] = {**trajectory[reward][max(results)], "steps": last["settings"]["steps"],
                                  "cfg": last["settings"]["cfg"]}
        for category in (TRAIN[1], held[0]):
            shutil.copyfile(Path(last["where"]) / f"samples_{category}.png", grids / f"rl-{reward}-{category}.png")
    for category in (TRAIN[1], held[0]):
        shutil.copyfile(Path(init["where"]) / f"samples_{category}.png", grids / f"init-{category}.png")
    table = markdown(models, runs, held, trajectory)
    (out / "rl.md").write_text(table)
    plot(runs, trajectory, models["init"], out / "trajectory.png")
    (out / "rl.json").write_text(json.dumps({"models": models, "runs": runs, "trajectory": trajectory,
                                             "trained": TRAIN, "held_out": held}, indent=1) + "\n")
    print(table)
    rows = []
    for reward in rewards:
        m = models[f"rl-{reward}"]
        for part in ("trained", "held_out"):
            c = m[f"{part}_change"]
            rows.append(row("rl", f"{reward} reward: adherence change on the {part.replace('_', '-')} categories",
                            c["mean"], "score", goal=">= 0" if part == "held_out" else "> 0", goal_of="value",
                            note=f"paired 95 % CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}"))
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
