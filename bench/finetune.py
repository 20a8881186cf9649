"""Fine-tuning a `tiny` model onto another scene distribution: full fine-tuning against LoRA at equal steps, each
scored for prompt adherence (95 % intervals) on the new distribution and, to see forgetting, on the default one.

    .venv/bin/python -m bench.finetune --out bench-out/finetune                        # ≈ 20 min, see Budget
    .venv/bin/python -m bench.finetune --out bench-out/finetune --base-run demo-out/run  # the demo's model, ≈ 11 min
    .venv/bin/python -m bench.finetune --out /tmp/finetune --quick                     # smoke test, ≈ 75 s

The new distribution: the demo's scenes (configs/demo.yaml `scenes:`: 1–3 objects, both sizes, no words), every
one on a single background (--background, default black) instead of a uniform draw of white, gray and black.
scenes/scene.py owns the vocabulary, and a new background colour or shape would need the renderer, the parser's
prototypes and the describer changed with it; the parser reads every background, so a narrowing is what the
existing world can score. It is a specialization, not a new skill: a third of the base's scenes were black, all
of the fine-tunes' are. What can move is adherence on black and, on the default distribution, the background
itself (forgetting white and gray): the six adherence categories ignore it, so background accuracy (the parsed
background is the prompt's) is reported beside them.

Steps (training and the default evaluation are `lensforge` processes; the same command again skips what is done):
1. DATA: --images renders of the new distribution (seed 1) → a shard set in the precompute format (pixel codec,
   MiniLM, dense captions, the real cache key: scenes/shards.py, as bench/train.py uses). Without
   --base-run also --images of the default distribution (seed 0), and a base trained on them with the demo's
   `train:` recipe (configs/demo.yaml, 900 steps). The demo itself curates ≈ 1,625 of its 2,000 web scenes.
2. `lensforge train --init-from BASE` (its EMA weights) twice on the new DATA with the demo's recipe, --steps each,
   warm-up --steps / 10, the same seed (so the same data order and noise), batch and LR schedule (--lr, default
   the demo's 2e-3): full, and LoRA (r --lora-rank, α = 2 r, peft adapters on the attention and MLP projections,
   training/train_config.py's LORA_TARGETS).
3. Adherence of base, full and LoRA (EMA weights): on the default distribution by `lensforge evaluate`; on the new
   one by the same prompts moved onto its background (`evaluate` cannot restrict its prompt set), sampled and
   scored here with scenes.adherence.evaluate exactly as `evaluate` does.
4. OUT/finetune.json and OUT/finetune.md: the tables, the checkpoint sizes (the full run's model.safetensors against
   the LoRA run's adapter.safetensors, and their step directories) and the median `step_s` of RUN/metrics.jsonl.
   Rows for BENCHMARKS.md go to $LENSFORGE_BENCH_JSON (bench/report.py).

Budget on 2 otherwise idle cores, from pipelines/ablate.py's measurements (tiny, batch 64, dense captions: 0.59 s a
step; 192 prompts ≈ 25 s): data ≈ 1 min, base 900 steps ≈ 9 min, fine-tunes 2 × 300 steps ≈ 6 min, six
evaluations with their process starts ≈ 3.5 min. On one thread of a shared machine a step took 1.0–1.2 s. At 32
prompts a category an interval is about ±0.17 a category and ±0.07 overall; --per-category 64 halves the variance.
OUT is reusable: the same command skips finished data, runs and evaluations, and other evaluation settings re-score
the runs; other training settings are refused (OUT/settings.json).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report and tests.training, also for `python bench/finetune.py`
from bench.report import emit, row  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
RUNS = ("base", "full", "lora")
CFG, SIZE, EVAL_BATCH = 4.0, 32, 16  # `lensforge evaluate`'s defaults, for both distributions
# --quick: every step once in seconds, a smoke test of this script and not a measurement
QUICK = {"images": 48, "base_steps": 3, "steps": 3, "per_category": 1, "sample_steps": 2}
QUICK_SETS = ["train.data.batch_size=8", "train.val.every=0", "train.log_every=1", "train.checkpoint_every=1000"]


# --- 1. data --------------------------------------------------------------------------------------------------


def scene_maker(background: str | None):
    """The demo's scene draw, moved onto `background` (None: the demo's uniform draw)."""
    from pipelines.config import load_section
    from scenes.scene import random_scene

    cfg = load_section("scenes", str(DEMO_CONFIG), [])

    def make(rng):
        scene = random_scene(rng, cfg.min_objects, cfg.max_objects, cfg.word_prob)
        return scene if background is None else replace(scene, background=background)
    return make


def write_data(data: Path, images: int, background: str | None, seed: int) -> Path:
    """DATA with one shard set of `images` 32² scenes; written once (its index.parquet is written last)."""
    from scenes.shards import write_scene_shards
    from training.shard_format import INDEX_FILE

    if not list(data.glob(f"shards/*/{INDEX_FILE}")):
        began = time.perf_counter()
        write_scene_shards(data, {(SIZE, SIZE): images}, seed=seed, shard_size=500, scene_fn=scene_maker(background))
        print(f"finetune: {images} scenes ({background or 'default backgrounds'}) → {data} in "
              f"{time.perf_counter() - began:.0f} s")
    return data


# --- 2. training ----------------------------------------------------------------------------------------------


def lensforge(args: list[str], log: Path, tag: str = "finetune") -> None:
    """One `lensforge` subcommand in its own process, its output in `log` (the end of it in the error)."""
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {code}; the end of {log}:\n{tail}")
    print(f"{tag}: lensforge {args[0]} {Path(args[args.index('--out') + 1]).name} in "
          f"{time.perf_counter() - began:.0f} s (log {log})")


def trained_to(run: Path) -> int:
    from inference.checkpoint import step_of
    from training.train_checkpoint import complete_checkpoints

    found = complete_checkpoints(run)
    return step_of(found[-1]) if found else 0


def demo_train():
    from pipelines.config import load_section

    return load_section("train", str(DEMO_CONFIG), [])


def train(run: Path, data: Path, steps: int, sets: list[str], init_from: Path | None = None) -> None:
    """`lensforge train` with the demo's recipe and `sets` to `steps` (resumed if interrupted, skipped if done)."""
    if trained_to(run) >= steps:
        return
    args = ["train", "--data", str(data), "--out", str(run), "--config", str(DEMO_CONFIG), "--max-steps", str(steps),
            "--resume", "--set", "train.progress=false"]
    if init_from is not None:  # the demo's train.model {prediction: x} is the base's already; init_from refuses it
        args += ["--init-from", str(init_from), "--set", "train.model={}"]
    for setting in sets:
        args += ["--set", setting]
    lensforge(args, run.parent / "logs" / f"train-{run.name}.log")


# --- 3. adherence ---------------------------------------------------------------------------------------------


def weights_of(source: Path) -> str:
    """The file `lensforge evaluate` names as its checkpoint: EMA weights, or a LoRA run's EMA adapter."""
    from inference.checkpoint import describe_denoiser

    found = describe_denoiser(source)
    return str(found.adapters[0][0] if found.adapters else found.files[0])


def is_fresh(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    found = json.loads(path.read_text())["settings"]
    return all(found.get(k) == v for k, v in expected.items())


def eval_default(source: Path, out: Path, per_category: int, steps: int) -> dict:
    """`lensforge evaluate` of a run (or step directory) on its own prompt set: OUT/adherence.json."""
    expected = {"checkpoint": weights_of(source), "per_category": per_category, "steps": steps}
    if not is_fresh(out / "adherence.json", expected):
        which = "--run" if (source / "checkpoints").is_dir() else "--checkpoint"
        lensforge(["evaluate", which, str(source), "--out", str(out), "--per-category", str(per_category),
                   "--steps", str(steps), "--cfg", str(CFG), "--size", str(SIZE), "--batch-size", str(EVAL_BATCH)],
                  out.parent / "logs" / f"evaluate-{out.name}.log")
    return json.loads((out / "adherence.json").read_text())


def new_items(per_category: int, background: str) -> list:
    """`lensforge evaluate`'s prompt set with every target scene on `background`, and its dense prompt redone."""
    from scenes.adherence import Item, prompt_set
    from scenes.describe import describe

    moved = [(it.category, replace(it.scene, background=background)) for it in prompt_set(per_category)]
    return [Item(category, scene, describe(scene, "dense")) for category, scene in moved]


def eval_new(source: Path, out: Path, per_category: int, steps: int, background: str) -> dict:
    """What `lensforge evaluate` does, on `new_items`: OUT/adherence.json and OUT/samples.png (a row a category)."""
    expected = {"checkpoint": weights_of(source), "per_category": per_category, "steps": steps,
                "background": background}
    if is_fresh(out / "adherence.json", expected):
        return json.loads((out / "adherence.json").read_text())
    import torch

    from inference.checkpoint import describe_denoiser
    from inference.generate import Pipeline, make_grid
    from scenes.adherence import evaluate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.bfloat16 if device == "cuda" else None
    pipe = Pipeline.from_source(describe_denoiser(source), device=device, dtype=torch.float32, autocast=autocast)
    images: list = []

    def generate(prompts: list[str], seeds: list[int]) -> list:
        batch = pipe.generate(prompts, SIZE, SIZE, steps=steps, cfg=CFG, seeds=seeds, batch_size=EVAL_BATCH)
        images.extend(batch)
        return batch

    began = time.perf_counter()
    result = evaluate(generate, new_items(per_category, background), size=SIZE, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols=per_category).save(out / "samples.png")
    settings = {**expected, "style": "dense", "size": SIZE, "cfg": CFG, "seed": 0, "device": device,
                "seconds": round(time.perf_counter() - began, 2)}
    record = {"settings": settings, **result.to_dict()}
    (out / "adherence.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"finetune: {out.name}: adherence {result.overall.text()} ({settings['seconds']} s)")
    return record


def scores(record: dict) -> dict:
    """Per category, background and overall: {"mean", "ci95"}, from an adherence.json."""
    from scenes.adherence_report import bootstrap

    right = [it["target"]["background"] == it["parsed"]["background"] for it in record["items"]]
    background = bootstrap({"background": np.array(right, dtype=np.float64)})[0]["background"]
    return {**{c: v["score"] for c, v in record["categories"].items()}, "background": background.to_dict(),
            "overall": record["overall"], "chance": record["chance"]}


# --- 4. costs and the report ----------------------------------------------------------------------------------


def run_cost(source: Path) -> dict:
    """The latest step's weights file (bytes, parameters: all of them, or a LoRA run's adapters, which is what
    trained), its step directory's bytes and the median step time of RUN/metrics.jsonl."""
    from inference.checkpoint import latest_step_dir
    from inference.weights_io import read_header

    step_dir = latest_step_dir(source) if (source / "checkpoints").is_dir() else source
    weights = next(step_dir / n for n in ("adapter.safetensors", "model.safetensors") if (step_dir / n).is_file())
    metrics = step_dir.parents[1] / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    step_s = [r["step_s"] for r in records if r["kind"] == "train"]
    return {"step_dir": str(step_dir), "weights_file": weights.name, "weights_bytes": weights.stat().st_size,
            "step_dir_bytes": sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()),  # optimizer too
            "median_step_s": statistics.median(step_s) if step_s else None,
            "parameters": sum(math.prod(shape) for _, shape, _, _ in read_header(weights)[0].values())}


def _ci(e: dict | None) -> str:
    return "–" if e is None else f"{e['mean']:.2f} ({e['ci95'][0]:.2f}–{e['ci95'][1]:.2f})"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    s, names = result["settings"], result["names"]
    lines = [f"# Fine-tuning `tiny` onto scenes on a {s['background']} background: full against LoRA", "",
             f"{s['steps']} steps each from the base `{s['base_run']}` on {s['images']} new scenes, the demo's recipe.",
             f"Adherence of the EMA weights: {s['per_category']} dense prompts a category, {s['sample_steps']} "
             f"sampling steps, CFG {CFG}, 95 % bootstrap intervals.",
             "`background`: the parsed background is the prompt's (no category tests it)."]
    for dist, title in ("new", f"new distribution ({s['background']} background)"), \
                       ("default", "default distribution (white, gray, black)"):
        table = result["adherence"][dist]
        lines += ["", f"## Adherence on the {title}", "", "| | " + " | ".join(names[r] for r in RUNS) + " |",
                  "|---|" + "---|" * len(RUNS)]
        for key in table["base"]:
            label = {"overall": "**overall**", "chance": "chance (overall)"}.get(key, key)
            lines.append(f"| {label} | " + " | ".join(_ci(table[r][key]) for r in RUNS) + " |")
    lines += ["", "## Cost", "", "Step dir: the latest checkpoint, weights, EMA and optimizer state together.", "",
              "| run | weights file | parameters in it | MB | step dir MB | median step (s) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in RUNS:
        c = result["costs"][r]
        lines.append(f"| {names[r]} | {c['weights_file']} | {c['parameters']:,} | "
                     f"{c['weights_bytes'] / 1e6:.3f} | {c['step_dir_bytes'] / 1e6:.3f} | "
                     f"{_num(c['median_step_s'], '.3f')} |")
    ratio = result["lora_over_full"]
    lines.append(f"| LoRA / full | | {ratio['parameters']:.3f}× | {ratio['weights_bytes']:.3f}× | "
                 f"{ratio['step_dir_bytes']:.3f}× | "
                 f"{_num(ratio['median_step_s'], '.2f')}× |")
    return "\n".join(lines) + "\n"


def bench_rows(result: dict) -> list[dict]:
    full, lora = result["costs"]["full"], result["costs"]["lora"]
    new, default, rank = result["adherence"]["new"], result["adherence"]["default"], result["settings"]["lora_rank"]
    rows = [row("finetune", f"LoRA r {rank} adapter.safetensors", lora["weights_bytes"] / 1e6, "MB",
                peer=full["weights_bytes"] / 1e6, peer_name="full fine-tune's model.safetensors")]
    if full["median_step_s"] and lora["median_step_s"]:
        rows.append(row("finetune", f"median step, LoRA r {rank}", lora["median_step_s"], "s",
                        peer=full["median_step_s"], peer_name="full fine-tune"))
    rows += [row("finetune", f"adherence on the new distribution, LoRA r {rank}", new["lora"]["overall"]["mean"],
                 "score", peer=new["full"]["overall"]["mean"], peer_name="full fine-tune"),
             row("finetune", "default-distribution background after the full fine-tune",
                 default["full"]["background"]["mean"], "score", peer=default["base"]["background"]["mean"],
                 peer_name="base")]
    return rows


# --- the measurement ------------------------------------------------------------------------------------------


def check_out(out: Path, identity: dict) -> None:
    """OUT/settings.json: what the runs in OUT were trained with; another training setup needs another OUT."""
    path = out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != identity:
        raise SystemExit(f"{out} holds runs trained otherwise ({path}: {path.read_text().strip()}); "
                         "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    from scenes.scene import BACKGROUNDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data, runs, evaluations and the report go here")
    parser.add_argument("--base-run", help="a tiny run (or step directory) trained on the default scenes, e.g. "
                        "demo-out/run; default: train one with the demo's recipe")
    parser.add_argument("--background", default="black", choices=list(BACKGROUNDS), help="the new distribution")
    parser.add_argument("--images", type=int, default=2000, help="scenes in each data set")
    parser.add_argument("--base-steps", type=int, default=None, help="base training (default: the demo's 900)")
    parser.add_argument("--steps", type=int, default=300, help="steps of each fine-tune")
    parser.add_argument("--lr", type=float, default=None, help="both fine-tunes (default: the demo's 2e-3)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA r (α = 2 r)")
    parser.add_argument("--per-category", type=int, default=32, help="adherence prompts a category")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the evaluations")
    parser.add_argument("--quick", action="store_true", help="tiny everything: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    base = Path(args.base_run).resolve() if args.base_run else out / "base"
    rank = args.lora_rank
    check_out(out, {k: getattr(args, k) for k in ("background", "images", "base_steps", "steps", "lr", "lora_rank",
                                                  "quick")} | {"base_run": args.base_run and str(base)})
    quick = QUICK_SETS if args.quick else []
    sets = [f"train.optim.warmup_steps={max(1, args.steps // 10)}", *quick]
    sets += [f"train.optim.lr={args.lr}"] if args.lr else []
    if not args.base_run:
        data = write_data(out / "data-default", args.images, None, seed=0)
        train(base, data, args.base_steps or demo_train().max_steps, quick)
    data = write_data(out / f"data-{args.background}", args.images, args.background, seed=1)
    train(out / "full", data, args.steps, sets, init_from=base)
    train(out / "lora", data, args.steps, [*sets, f"train.lora={{rank: {rank}, alpha: {2 * rank}}}"], init_from=base)

    sources = {"base": base, "full": out / "full", "lora": out / "lora"}
    adherence = {"new": {}, "default": {}}
    for name, source in sources.items():
        adherence["new"][name] = scores(eval_new(source, out / "eval" / f"{name}-new", args.per_category,
                                                 args.sample_steps, args.background))
        adherence["default"][name] = scores(eval_default(source, out / "eval" / f"{name}-default",
                                                         args.per_category, args.sample_steps))
    costs = {name: run_cost(source) for name, source in sources.items()}
    ratio = {k: (costs["lora"][k] / costs["full"][k] if costs["lora"][k] and costs["full"][k] else None)
             for k in ("parameters", "weights_bytes", "step_dir_bytes", "median_step_s")}
    result = {"settings": {**vars(args), "base_run": str(base), "cfg": CFG, "size": SIZE},
              "names": {"base": "base", "full": "full fine-tune", "lora": f"LoRA r {rank}"},
              "adherence": adherence, "costs": costs, "lora_over_full": ratio}
    (out / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "finetune.md").write_text(text)
    print(f"\n{text}\n→ {out / 'finetune.md'}, {out / 'finetune.json'}")
    emit(bench_rows(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
