"""`lensforge ablate caption-density`: one model per caption variant with everything else equal (model, recipe,
steps, seed, shard set and so data order), each scored for prompt adherence with 95 % intervals and the chance
level — CPU-RECIPES.md's "caption-density effect", as a command.

    lensforge ablate caption-density --data abl/data --out abl/density                  # 3 × 1,200 steps, ≈ 32 min
    lensforge ablate caption-density --data abl/data --out abl/density --seeds 3        # the same out: adds seeds
    lensforge ablate caption-density --data abl/data --out abl/sweep --variants dense --sweep-words 7,15,23
    lensforge ablate caption-density ... --variants dense,mix:dense=0.5+alt=0.5         # a caption mix is a variant

DATA: shards holding every caption variant named (a `mix:` names several; `--sweep-words 7,15` adds `dense@7`,
`dense@15`, the dense caption cut to its first N words). The synthetic-scene data, in one command:

    lensforge demo --out abl --set caption.variants=[dense,short] \\
        --set precompute.variants=[dense,short,alt,dense@7,dense@15,dense@23] --until precompute   # DATA = abl/data

A scenes dense caption opens with "Two objects on a plain white background." (7 words), then 7–8 words per object
("A large red circle in the top left."): 7, 15 and 23 words keep the count and background, then the first object,
then the second. Captions from a captioner (~100 words) suit a sweep like 5,15,40,100.

A shard set that lacks a variant is refused with the exact `lensforge precompute` command that adds it (this
command does not run precompute: it takes Ray and minutes, and makes a new shard set).

The recipe: the `train:` section of --config (default configs/demo.yaml, CPU-RECIPES.md's measured recipe) with
--set overrides; per run only `data.captions` (the variant's mix), `seed` (base seed + k for seed k) and
`max_steps` (--steps) change. The data order of a seed is the same for every variant: the loader's draws depend on
(seed, step) and the shard set only. Each run is scored on dense prompts (the common yardstick) and, where the
variant's main caption has a scenes style, on prompts in that style: `short` → short, `alt` → tags (like alt text,
a bare "colour shape" phrase; no scenes style has alt's single wrong-ish object), `X@N` → X's prompts cut to N words.
CPU-RECIPES.md: a short-caption model reacts oddly to dense prompts, so both are reported.

Outputs in OUT: runs/<variant>-s<seed>/ (a `lensforge train` run, plus adherence-dense.json and adherence-own.json
and their sample grids), results.csv, results.md, adherence.png, val_loss.png, words.png, sweep.png (with
--sweep-words), README.md (the command and the numbers), ablate.json (settings, shard set, command) and
config.train.yaml (the resolved base recipe, a valid --config file). Killed or interrupted: run the same command;
finished training and evaluations are skipped. OUT refuses a rerun that would train differently (other --steps,
recipe or shard set); other evaluation settings (--per-category 64, --sample-steps ...) re-score its models.

Budget, measured on 2 otherwise idle CPU cores on the demo's scenes (1,625 images, 3 % held out): tiny at batch 64
takes 0.59 s a step on dense captions (≈ 40 text tokens), 0.44 on short and 0.38 on alt, so 1,200 steps take
8–12 min; an evaluation of 192 prompts (32 a category, 25 steps, CFG 4) ≈ 25 s; alt,short,dense ≈ 32 min in all
(1,400 steps ≈ 36 min), more while other jobs share the cores. At 32 prompts a category the overall interval is
about ±0.07 (±0.17 per category); the seed-to-seed spread is the larger unknown.

Larger runs: --seeds 3 (≈ 1 h 35 min on the CPU; rerunning an OUT with a higher count adds the seeds),
--per-category 64 (±0.05; rerunning re-scores the models), --steps 2500 for better shapes (CPU-RECIPES.md). On a
GPU (not measured here) the same command trains and samples on cuda in bf16 (`train.precision: auto`); there use
--steps 5000 --seeds 3 --per-category 64 --eval-batch-size 256, and split the variants over GPUs: one command per
GPU (CUDA_VISIBLE_DEVICES=i, a subset of --variants, the same --out), then the full command once more to write the
combined report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from common.atomic import write_json
from pipelines.ablate_data import resolve_shard_set, words_json
from training.caption_variants import split_variant, truncated
from training.train_config import TrainConfig

STUDIES = ("caption-density",)
DEFAULT_VARIANTS = "alt,short,dense"
DEFAULT_STEPS = 1200  # tiny, batch 64, 2 CPU cores: 12 min on dense captions (0.59 s/step), 8 on alt (0.38)
DEFAULT_PER_CATEGORY = 32  # 192 prompts an evaluation: ≈ 25 s on 2 cores at 25 steps with CFG 4
DEFAULT_EVAL_BATCH = 16  # on 2 cores 16 samples faster than 64 (13 s vs 15 s for 96 prompts)
YARDSTICK = "dense"  # every model is scored on dense prompts
# Caption variant → the scenes style of prompts "in its own style" (scenes.describe.STYLES).
OWN_STYLE = {"dense": "dense", "medium": "medium", "short": "short", "tags": "tags", "alt": "tags"}
RECORD = "ablate.json"
# Train settings that cannot change a number (or that each run sets itself): free to differ on a rerun.
NOT_IN_IDENTITY = {"progress": True, "log_every": True, "checkpoint_every": True, "keep_checkpoints": True,
                   "max_steps": True, "data": {"captions", "shard_set", "prefetch"}}


class AblateSettings(BaseModel):
    """Everything that decides an ablation's numbers, written to OUT/ablate.json."""

    model_config = ConfigDict(extra="forbid")

    study: str = "caption-density"
    variants: list[str] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    steps: int = Field(DEFAULT_STEPS, ge=1)
    sweep_words: list[int] = []
    sweep_base: str = "dense"
    per_category: int = Field(DEFAULT_PER_CATEGORY, ge=1)
    sample_steps: int = Field(25, ge=1)
    cfg: float = Field(4.0, ge=0)
    size: int = Field(32, ge=16)
    eval_batch_size: int = Field(DEFAULT_EVAL_BATCH, ge=1)
    device: str = "auto"

    def identity(self) -> dict:
        """What a rerun into the same OUT must share with the first run: what the trained models depend on.
        Variants and seeds may grow; other evaluation settings re-score the finished models."""
        return self.model_dump(include={"study", "steps"})


@dataclass(frozen=True)
class Variant:
    """A trained variant: `dense` (one caption variant), `dense@15` (truncated) or `mix:dense=0.5+alt=0.5`."""

    name: str
    mix: dict[str, float] = field(hash=False)

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")

    def run_dir(self, out: Path, seed: int) -> Path:
        return out / "runs" / f"{self.slug}-s{seed}"

    def prompt_sets(self) -> dict[str, tuple[str, int | None]]:
        """Evaluation name → (scenes style, words or None): always dense; `own` where the main variant of the mix
        (the largest weight, the first of ties) has a scenes style other than plain dense."""
        sets = {YARDSTICK: (YARDSTICK, None)}
        base, words = split_variant(max(self.mix, key=self.mix.get))
        style = OWN_STYLE.get(base)
        if style is not None and (style, words) != (YARDSTICK, None):
            sets["own"] = (style, words)
        return sets


def parse_variant(text: str) -> Variant:
    """`dense` → {dense: 1}; `mix:dense=0.5+alt=0.5` → {dense: 0.5, alt: 0.5}; ValueError saying what is wrong."""
    text = text.strip()
    if not text.startswith("mix:"):
        split_variant(text)
        return Variant(text, {text: 1.0})
    mix: dict[str, float] = {}
    for part in text[4:].split("+"):
        name, sep, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or value <= 0:
            raise ValueError(f"variant {text!r}: {part!r} is not NAME=WEIGHT with a positive weight "
                             "(e.g. mix:dense=0.5+alt=0.5)")
        split_variant(name)
        if name in mix:
            raise ValueError(f"variant {text!r}: {name} appears twice")
        mix[name] = value
    return Variant(text, mix)


def study_variants(variants: str, sweep_words: list[int], sweep_base: str = "dense") -> list[Variant]:
    """--variants, then one `<base>@<N>` per --sweep-words entry; a name given twice counts once."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    names += [truncated(sweep_base, n) for n in sweep_words]
    if not names:
        raise ValueError("--variants names no variant")
    return [parse_variant(name) for name in dict.fromkeys(names)]


def needed_variants(variants: list[Variant]) -> list[str]:
    return list(dict.fromkeys(v for variant in variants for v in variant.mix))


# --- one run: train, then evaluate ----------------------------------------------------------------------------


def run_config(base: TrainConfig, variant: Variant, seed: int, steps: int) -> TrainConfig:
    raw = base.model_dump()
    raw["data"] = {**raw["data"], "captions": dict(variant.mix), "shard_set": None}
    return TrainConfig.model_validate({**raw, "seed": seed, "max_steps": steps})


def trained_to(run: Path) -> int:
    from inference.checkpoint import step_of
    from training.train_checkpoint import complete_checkpoints

    found = complete_checkpoints(run)
    return step_of(found[-1]) if found else 0


def train_run(cfg: TrainConfig, set_dir: Path, run: Path) -> bool:
    """Train (or finish training) one run; False if it was already done."""
    from training.trainer import TrainingStopped, train

    if trained_to(run) >= cfg.max_steps:
        return False
    try:
        train(cfg, set_dir, run, resume=True)
    except TrainingStopped as err:
        raise RuntimeError(f"{run.name}: {err}") from None
    return True


def prompt_items(per_category: int, style: str, words: int | None) -> list:
    from dataclasses import replace

    from scenes.adherence import prompt_set
    from training.caption_variants import truncate_words

    items = prompt_set(per_category=per_category, style=style)
    return items if words is None else [replace(it, prompt=truncate_words(it.prompt, words)) for it in items]


def eval_settings(s: AblateSettings, style: str, words: int | None, seed: int, step: int) -> dict:
    return {"style": style, "words": words, "per_category": s.per_category, "steps": s.sample_steps, "cfg": s.cfg,
            "size": s.size, "seed": 100_000 * seed, "step": step}


def eval_done(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    found = json.loads(path.read_text()).get("settings", {})
    return all(found.get(k) == v for k, v in expected.items())


def evaluate_run(run: Path, variant: Variant, s: AblateSettings, seed: int) -> int:
    """OUT/runs/<run>/adherence-<name>.json and samples-<name>.png for each prompt set not yet scored; how many."""
    todo = {name: eval_settings(s, style, words, seed, s.steps) for name, (style, words) in
            variant.prompt_sets().items()}
    todo = {name: e for name, e in todo.items() if not eval_done(run / f"adherence-{name}.json", e)}
    if not todo:
        return 0
    import torch

    from inference.checkpoint import resolve_checkpoint
    from inference.generate import Pipeline, make_grid
    from scenes.adherence import evaluate

    weights, spec = resolve_checkpoint(run=run)  # EMA weights
    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    pipe = Pipeline.load(weights, spec, device=device, autocast=torch.bfloat16 if device.startswith("cuda") else None)
    for name, settings in todo.items():
        items = prompt_items(s.per_category, settings["style"], settings["words"])
        images: list = []

        def generate(prompts, seeds):
            batch = pipe.generate(prompts, s.size, s.size, steps=s.sample_steps, cfg=s.cfg, seeds=seeds,
                                  batch_size=s.eval_batch_size)
            images.extend(batch)
            return batch

        began = time.perf_counter()
        result = evaluate(generate, items, size=s.size, seed=settings["seed"])
        make_grid(images, cols=s.per_category).save(run / f"samples-{name}.png")  # a row per category
        record = {"settings": {**settings, "checkpoint": str(weights), "device": device,
                               "seconds": round(time.perf_counter() - began, 2)}, **result.to_dict()}
        write_json(run / f"adherence-{name}.json", record)
        cut = "" if settings["words"] is None else f" cut to {settings['words']} words"
        print(f"ablate: {run.name} on {name} prompts ({settings['style']}{cut}): adherence {result.overall.text()}")
    return len(todo)


# --- the study ------------------------------------------------------------------------------------------------


def check_record(out: Path, s: AblateSettings, base: TrainConfig, set_dir: Path) -> dict:
    """OUT/ablate.json's fixed part; ValueError if OUT holds an ablation made with other settings."""
    train = base.model_dump(mode="json", exclude=NOT_IN_IDENTITY)
    fixed = {**s.identity(), "train": train, "shard_set": set_dir.name}
    path = out / RECORD
    if path.is_file():
        old = json.loads(path.read_text()).get("fixed", {})
        differ = sorted(k for k in _flat(old).keys() | _flat(fixed).keys() if _flat(old).get(k) != _flat(fixed).get(k))
        if differ:
            raise ValueError(f"{out} holds an ablation with other settings ({', '.join(differ[:4])} differ; see "
                             f"{path}): rerun with those, or choose another --out")
    return fixed


def with_shard_set(cfg: TrainConfig, set_id: str | None) -> TrainConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"shard_set": set_id})})


def recorded_shard_set(out: Path) -> str | None:
    path = Path(out) / RECORD
    return json.loads(path.read_text()).get("fixed", {}).get("shard_set") if path.is_file() else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run_ablation(s: AblateSettings, base: TrainConfig, data: str | Path, out: str | Path, config_file: str | Path,
                 command: str) -> Path:
    """Train and evaluate every (variant, seed) not yet done, seed by seed, then write the report; OUT/README.md."""
    from pipelines.ablate_report import write_report
    from pipelines.config import save_resolved

    out = Path(out)
    variants = study_variants(",".join(s.variants), s.sweep_words, s.sweep_base)
    if not base.data.shard_set:  # a rerun reads the set the study started on, even if DATA has more sets now
        base = with_shard_set(base, recorded_shard_set(out))
    set_dir = resolve_shard_set(data, base, needed_variants(variants), config_file)
    base = with_shard_set(base, set_dir.name if set_dir != Path(data) else None)  # config.train.yaml names it
    fixed = check_record(out, s, base, set_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RECORD, {"fixed": fixed, "settings": s.model_dump(), "command": command, "data": str(data),
                              "shard_set_dir": str(set_dir), "mixes": {v.name: v.mix for v in variants}})
    save_resolved(base, "train", out)
    (out / "command.txt").write_text(command + "\n")
    words = words_json(out, set_dir, base.data.holdout)
    for name in needed_variants(variants):
        if words[name].get("cut") == 0:
            base_name, n = split_variant(name)
            print(f"ablate: {name} cuts no caption (every {base_name} caption has ≤ {n} words): it trains on "
                  f"the same captions as {base_name}")
    seeds = [base.seed + k for k in range(s.seeds)]
    jobs = [(v, seed) for seed in seeds for v in variants]
    for i, (variant, seed) in enumerate(jobs, 1):
        run = variant.run_dir(out, seed)
        cfg = run_config(base, variant, seed, s.steps)
        began = time.time()
        print(f"ablate: [{i}/{len(jobs)}] {run.name}: captions {variant.mix}, seed {seed}, {s.steps} steps",
              flush=True)
        trained, evaluated = train_run(cfg, set_dir, run), evaluate_run(run, variant, s, seed)
        what = "finished earlier, skipped" if not (trained or evaluated) else f"done in {time.time() - began:.0f} s"
        print(f"ablate: [{i}/{len(jobs)}] {run.name} {what}", flush=True)
        if (trained or evaluated) and i < len(jobs):
            write_report(out, s, variants, seeds, words, command)  # what is finished so far, readable meanwhile
    return write_report(out, s, variants, seeds, words, command)
