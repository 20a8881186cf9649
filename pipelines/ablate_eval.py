"""The evaluations of one `lensforge ablate` run (pipelines/ablate.py): its model sampled on adherence prompts in
three styles, and an earlier checkpoint of it on dense prompts for the time-matched view.

    sets = prompt_sets(variant.mix)                # {"dense": {...}, "short": {...}, "own": {...}} (own: if it differs)
    evaluate_run(run, sets, settings, seed)        # RUN/adherence-<set>.json + samples-<set>.png, each once
    evaluate_time_matched(runs, settings, seed)    # a seed's slower arms at the fastest arm's training time

Prompt styles: `dense` and `short` for every model (the common yardsticks), and `own`, drawn per prompt the way
the model's captions were drawn in training: `alt` → tags (the bare "colour shape" phrase nearest to alt text),
`mixed` → dense or short with the mix's odds, `dense@random` → dense cut to a uniform number of words (the trainer's
own rule, training/caption_cut.py), `dense@16` → dense cut to 16 words. A model whose own style is plain dense or
short has no `own` set. Per prompt the draw depends on the prompt's index only (a string seed), so two arms with the
same mix are asked the same prompts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

from common.atomic import write_json
from training.caption_cut import draw_cut
from training.caption_variants import random_base, split_variant, truncate_words

STYLES = ("dense", "short")  # every model is scored on both
# Caption variant → the scenes style of prompts "in its own style" (scenes.describe.STYLES).
OWN_STYLE = {"dense": "dense", "medium": "medium", "short": "short", "tags": "tags", "alt": "tags"}
RANDOM = "random"


def own_entries(mix: dict[str, float]) -> list[tuple[str, int | str | None, float]] | None:
    """The mix as (scenes style, cut: None | N words | "random", weight); None if a variant has no scenes style."""
    entries = []
    for name, weight in mix.items():
        base = random_base(name)
        base, cut = (base, RANDOM) if base is not None else split_variant(name)
        if base not in OWN_STYLE:
            return None
        entries.append((OWN_STYLE[base], cut, float(weight)))
    return entries


def prompt_sets(mix: dict[str, float], styles: tuple[str, ...] = STYLES) -> dict[str, dict]:
    """Evaluation name → {"style", "words", "own"}: `styles`, then `own` where the mix's prompts differ from them."""
    sets = {style: {"style": style, "words": None, "own": None} for style in styles}
    entries = own_entries(mix)
    if entries and not (len(entries) == 1 and entries[0][1] is None and entries[0][0] in styles):
        if len(entries) == 1 and isinstance(entries[0][1], int | None):
            sets["own"] = {"style": entries[0][0], "words": entries[0][1], "own": None}
        else:
            sets["own"] = {"style": "own", "words": None, "own": [list(e) for e in entries]}
    return sets


def prompt_items(per_category: int, world: str, spec: dict) -> list:
    """The adherence items of one prompt set (scenes.adherence.prompt_set, cut or drawn per prompt as `spec` says)."""
    from scenes.adherence import prompt_set

    if spec["own"] is None:
        items = prompt_set(per_category=per_category, style=spec["style"], world=world)
        return items if spec["words"] is None else [replace(it, prompt=truncate_words(it.prompt, spec["words"]))
                                                    for it in items]
    entries = spec["own"]
    by_style = {style: prompt_set(per_category=per_category, style=style, world=world)
                for style in {e[0] for e in entries}}
    items = []
    for k in range(len(next(iter(by_style.values())))):
        rng = random.Random(f"ablate/own/{k}")
        u = rng.random() * sum(e[2] for e in entries)
        style, cut, _ = next(e for i, e in enumerate(entries) if u < sum(x[2] for x in entries[:i + 1]))
        item = by_style[style][k]
        if cut == RANDOM:
            item = replace(item, prompt=draw_cut(item.prompt, rng.random())[0])
        elif cut is not None:
            item = replace(item, prompt=truncate_words(item.prompt, cut))
        items.append(item)
    return items


def eval_settings(s, spec: dict, seed: int, step: int) -> dict:
    return {**spec, "world": s.world, "per_category": s.per_category, "steps": s.sample_steps, "cfg": s.cfg,
            "size": s.size, "seed": 100_000 * seed, "step": step}


def eval_done(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    found = json.loads(path.read_text()).get("settings", {})
    return all(found.get(k) == v for k, v in expected.items())


def todo_evaluations(run: Path, sets: dict[str, dict], s, seed: int) -> dict[str, dict]:
    """File name → settings of each evaluation of the last step not yet done."""
    todo = {f"adherence-{name}.json": eval_settings(s, spec, seed, s.steps) for name, spec in sets.items()}
    return {name: e for name, e in todo.items() if not eval_done(run / name, e)}


def checkpoints(run: Path) -> dict[int, Path]:
    from inference.checkpoint import step_of
    from training.train_checkpoint import complete_checkpoints

    return {step_of(c): c for c in complete_checkpoints(run)}


def evaluate_run(run: Path, sets: dict[str, dict], s, seed: int) -> int:
    """Sample and score each evaluation not yet done; how many were done. A checkpoint that is gone (a study's
    results copied without them) is said in one line and skipped."""
    todo = todo_evaluations(run, sets, s, seed)
    if not todo:
        return 0
    where = checkpoints(run).get(s.steps)
    if where is None:
        print(f"ablate: {run.name}: no checkpoint at step {s.steps} to evaluate ({', '.join(todo)} missing): delete "
              "the run folder to retrain it")
        return 0
    return evaluate_checkpoint(run, where, todo, s)


def step_in(path: Path) -> int:
    """adherence-dense-step120.json → 120."""
    return int(path.stem.rsplit("step", 1)[1])


def evaluate_time_matched(runs: dict[str, Path], s, seed: int) -> int:
    """Once every arm of a seed is trained: T = the fastest arm's training seconds; each slower arm scored on dense
    prompts at its checkpoint nearest to T (RUN/adherence-dense-step<N>.json, `train_seconds` and `time_limit` in
    its settings); then each run keeps only that checkpoint and its last."""
    import shutil

    from pipelines.ablate import train_seconds, trained

    seconds = {name: (trained(run) or {}).get("seconds") for name, run in runs.items()}
    if any(v is None for v in seconds.values()):
        return 0  # an arm of this seed is not trained yet
    limit = min(seconds.values())
    done = 0
    for name, run in runs.items():
        kept, keep = checkpoints(run), {s.steps}
        if seconds[name] > limit:
            previous = sorted(run.glob("adherence-dense-step*.json"))
            spec = {"style": "dense", "words": None, "own": None}
            settled = [p for p in previous if eval_done(p, {**eval_settings(s, spec, seed, step_in(p)),
                                                            "time_limit": limit})]
            clock = train_seconds(run)
            steps = [step for step in kept if step in clock and step < s.steps]
            if settled:
                keep.add(step_in(settled[0]))
            elif not steps:
                print(f"ablate: {run.name}: no checkpoint left to score at {limit:.0f} s (time-matched view)")
            else:
                step = min(steps, key=lambda st: abs(clock[st] - limit))
                for stale in previous:
                    stale.unlink()
                settings = {**eval_settings(s, spec, seed, step), "time_limit": limit, "train_seconds": clock[step]}
                done += evaluate_checkpoint(run, kept[step], {f"adherence-dense-step{step}.json": settings}, s)
                keep.add(step)
        for step, path in kept.items():
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)  # the view is settled: only its checkpoints stay
    return done


def evaluate_checkpoint(run: Path, checkpoint: Path, evaluations: dict[str, dict], s) -> int:
    """Sample and score each of `evaluations` (file name → settings) with one checkpoint's EMA weights; RUN/<name>
    and its sample grid written; how many."""
    import torch

    from inference.checkpoint import resolve_checkpoint
    from inference.generate import Pipeline, make_grid
    from scenes.adherence import evaluate

    weights, spec = resolve_checkpoint(checkpoint=checkpoint)  # EMA weights
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    pipe = Pipeline.load(weights, spec, device=device, autocast=torch.bfloat16 if device.startswith("cuda") else None)
    for name, settings in evaluations.items():
        items = prompt_items(s.per_category, s.world, settings)
        images: list = []

        def generate(prompts, seeds):
            batch = pipe.generate(prompts, s.size, s.size, steps=s.sample_steps, cfg=s.cfg, seeds=seeds,
                                  batch_size=s.eval_batch_size)
            images.extend(batch)
            return batch

        began = time.perf_counter()
        result = evaluate(generate, items, size=s.size, seed=settings["seed"])
        grid = name.replace("adherence-", "samples-").replace(".json", ".png")
        make_grid(images, cols=s.per_category).save(run / grid)  # a row per category
        record = {"settings": {**settings, "checkpoint": str(weights), "device": device,
                               "seconds": round(time.perf_counter() - began, 2)}, **result.to_dict()}
        write_json(run / name, record)
        print(f"ablate: {run.name} step {settings['step']}, {name[10:-5]} prompts: adherence {result.overall.text()}")
    return len(evaluations)
