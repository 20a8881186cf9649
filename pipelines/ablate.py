"""`lensforge ablate caption-density`: one model per caption arm with everything else equal (model, recipe, steps,
seed, shard set and so data order), each scored for prompt adherence in three prompt styles, with intervals from a
bootstrap over seeds and prompts together — Lens Fig. 4's brief / detailed / mixed comparison, as a command.

    lensforge ablate caption-density --data abl/data --out abl/density --world rich             # the five arms
    lensforge ablate caption-density --data abl/data --out abl/density --world rich --seeds 3   # adds seeds
    lensforge ablate caption-density ... --sweep-words 8,16,32,64                               # + a length sweep

Arms (--variants; any caption mix works too, e.g. `mix:dense=0.7+alt=0.3` or `dense@15`):

    alt             the web's alt text                      short           one brief sentence
    dense           the whole description                   mixed           dense or short, 50/50 per draw
    random-length   dense cut to a uniformly drawn number of words per draw (`dense@random`)

The mix and the per-draw cut are the trainer's caption mix (train.data.captions); only `dense@N` is a stored copy.
DATA holds the stored variants the arms read; for the synthetic scenes, in one command:

    lensforge demo --out abl --config docs/ablations/caption-density/study.yaml --until precompute  # DATA = abl/data

Per run only `data.captions` (the arm's mix), `seed` (base seed + k), `max_steps` (--steps), the checkpoint cadence
and `val.captions` (dense for every run: one caption style, so the validation curves compare) change. The data
order of a seed is the same for every arm: the loader's draws depend on (seed, step) and the shard set only.
Evaluations (pipelines/ablate_eval.py): dense, short and the arm's own prompts at the last step; and, for the
time-matched view, once all arms of a seed are trained, each slower arm on dense prompts at its checkpoint (one every
--time-every steps) nearest to the fastest arm's training time. The sweep's runs (`dense@N`) take the first
--sweep-seeds seeds and are scored on dense and their own (cut) prompts.

Outputs in OUT: runs/<arm>-s<seed>/ (a `lensforge train` run, its adherence-*.json and sample grids, and
trained.json: steps and training seconds, so a study copied without its checkpoints keeps its numbers),
results.csv, results.md, README.md and the plots (pipelines/ablate_report.py), ablate.json (settings, shard set,
command), config.train.yaml (the resolved base recipe). Killed or interrupted: run the same command; finished
training and evaluations are skipped. OUT refuses a rerun that would train differently (other --steps, world, recipe
or shard set); other evaluation settings re-score its models. The budget of the published study, and the settings
for a GPU: docs/ablations/caption-density/README.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from common.atomic import write_json
from pipelines.ablate_data import resolve_shard_set, words_json
from training.caption_variants import split_variant, stored_variant, truncated
from training.train_config import TrainConfig

STUDIES = ("caption-density",)
# Named arms → their caption mix (the syntax of parse_variant).
ARMS = {"alt": "alt", "short": "short", "dense": "dense", "mixed": "mix:dense=0.5+short=0.5",
        "random-length": "dense@random"}
DEFAULT_VARIANTS = "alt,short,dense,mixed,random-length"
DEFAULT_STEPS = 600  # the published study's (docs/ablations/caption-density/README.md: its budget)
DEFAULT_PER_CATEGORY = 16  # × 11 rich categories = 176 prompts an evaluation
DEFAULT_EVAL_BATCH = 16  # on 2 cores 16 samples faster than 64 (13 s vs 15 s for 96 prompts)
VAL_CAPTIONS = "dense"  # every run's validation loss: one caption style, so the curves compare
RECORD = "ablate.json"
TRAINED = "trained.json"  # RUN/trained.json: {"steps", "seconds"}, written when training ends
# Train settings that cannot change a number (or that each run sets itself): free to differ on a rerun.
NOT_IN_IDENTITY = {"progress": True, "log_every": True, "checkpoint_every": True, "keep_checkpoints": True,
                   "max_steps": True, "data": {"captions", "shard_set", "prefetch"}, "val": {"captions"}}


class AblateSettings(BaseModel):
    """Everything that decides an ablation's numbers, written to OUT/ablate.json."""

    model_config = ConfigDict(extra="forbid")

    study: str = "caption-density"
    variants: list[str] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    steps: int = Field(DEFAULT_STEPS, ge=1)
    world: str = "basic"
    sweep_words: list[int] = []
    sweep_base: str = "dense"
    sweep_seeds: int = Field(1, ge=1)
    time_every: int = Field(25, ge=0, description="checkpoint cadence of the time-matched view (0: off)")
    per_category: int = Field(DEFAULT_PER_CATEGORY, ge=1)
    sample_steps: int = Field(25, ge=1)
    cfg: float = Field(4.0, ge=0)
    size: int = Field(32, ge=16)
    eval_batch_size: int = Field(DEFAULT_EVAL_BATCH, ge=1)
    device: str = "auto"

    def identity(self) -> dict:
        """What a rerun into the same OUT must share with the first run: what the trained models depend on.
        Variants and seeds may grow; other evaluation settings re-score the finished models."""
        return self.model_dump(include={"study", "steps", "world"})


@dataclass(frozen=True)
class Variant:
    """A trained arm: a name (`mixed`, `dense@15`, `mix:dense=0.7+alt=0.3`) and its caption mix."""

    name: str
    mix: dict[str, float] = field(hash=False)
    sweep: bool = False  # a length-sweep run: first --sweep-seeds seeds, dense and own prompts only

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-")

    def run_dir(self, out: Path, seed: int) -> Path:
        return out / "runs" / f"{self.slug}-s{seed}"

    def prompt_sets(self) -> dict[str, dict]:
        from pipelines.ablate_eval import prompt_sets

        sets = prompt_sets(self.mix)
        return {k: v for k, v in sets.items() if k != "short"} if self.sweep else sets


def parse_variant(text: str, sweep: bool = False) -> Variant:
    """`mixed` → ARMS' mix; `dense` → {dense: 1}; `mix:dense=0.5+alt=0.5` → {dense: 0.5, alt: 0.5}; ValueError
    saying what is wrong."""
    text = text.strip()
    spec = ARMS.get(text, text)
    if not spec.startswith("mix:"):
        stored_variant(spec)
        return Variant(text, {spec: 1.0}, sweep)
    mix: dict[str, float] = {}
    for part in spec[4:].split("+"):
        name, sep, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or value <= 0:
            raise ValueError(f"variant {text!r}: {part!r} is not NAME=WEIGHT with a positive weight "
                             "(e.g. mix:dense=0.5+alt=0.5)")
        stored_variant(name)
        if name in mix:
            raise ValueError(f"variant {text!r}: {name} appears twice")
        mix[name] = value
    return Variant(text, mix, sweep)


def study_variants(variants: str, sweep_words: list[int], sweep_base: str = "dense") -> list[Variant]:
    """--variants, then one `<base>@<N>` per --sweep-words entry; a name given twice counts once."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    if not names and not sweep_words:
        raise ValueError("--variants names no variant")
    out = {name: parse_variant(name) for name in names}
    for n in sweep_words:
        name = truncated(sweep_base, n)
        out.setdefault(name, parse_variant(name, sweep=True))
    return list(out.values())


def needed_variants(variants: list[Variant]) -> list[str]:
    """The stored caption variants the arms read (a random-length one reads its base), validation's included."""
    return list(dict.fromkeys([VAL_CAPTIONS] + [stored_variant(v) for variant in variants for v in variant.mix]))


def run_seeds(variant: Variant, s: AblateSettings, base_seed: int) -> list[int]:
    return [base_seed + k for k in range(s.sweep_seeds if variant.sweep else s.seeds)]


# --- one run: train, then evaluate ----------------------------------------------------------------------------


def run_config(base: TrainConfig, variant: Variant, seed: int, steps: int, every: int = 0) -> TrainConfig:
    """The base recipe with this arm's captions, seed and steps; with `every`, a checkpoint every that many steps,
    all kept (the time-matched view picks one; pipelines/ablate_eval.py prunes the rest)."""
    raw = base.model_dump()
    raw["data"] = {**raw["data"], "captions": dict(variant.mix), "shard_set": None}
    raw["val"] = {**raw["val"], "captions": VAL_CAPTIONS}
    cadence = {"checkpoint_every": every, "keep_checkpoints": math.ceil(steps / every) + 1} if every else {}
    return TrainConfig.model_validate({**raw, "seed": seed, "max_steps": steps, **cadence})


def trained(run: Path) -> dict | None:
    path = run / TRAINED
    return json.loads(path.read_text()) if path.is_file() else None


def train_seconds(run: Path) -> dict[int, float]:
    """Step → seconds of training up to it (the trainer's step_s, data wait included, summed over the logged
    windows; validation and checkpoint writes not counted): a killed and resumed run counts each step once."""
    path = run / "metrics.jsonl"
    windows: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train":
                windows[record["step"]] = record["step_s"]
    total, last, out = 0.0, 0, {}
    for step in sorted(windows):
        total += windows[step] * (step - last)
        last, out[step] = step, round(total, 2)
    return out


def train_run(cfg: TrainConfig, set_dir: Path, run: Path) -> bool:
    """Train (or finish training) one run, then write RUN/trained.json; False if it was already done."""
    from training.trainer import TrainingStopped, train

    done = trained(run)
    if done and done.get("steps", 0) >= cfg.max_steps:
        return False
    try:
        train(cfg, set_dir, run, resume=True)
    except TrainingStopped as err:
        raise RuntimeError(f"{run.name}: {err}") from None
    write_json(run / TRAINED, {"steps": cfg.max_steps, "seconds": train_seconds(run).get(cfg.max_steps)})
    return True


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
                 command: str, report_only: bool = False) -> Path:
    """Train and evaluate every (arm, seed) not yet done, seed by seed, then write the report; OUT/README.md.
    `report_only`: the report of what is finished, nothing trained or scored."""
    from pipelines.ablate_eval import evaluate_run, evaluate_time_matched
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
    # The arms seed by seed (a seed's time-matched view as soon as its arms are trained), then the sweep.
    jobs = [(v, base.seed + k) for k in range(s.seeds) for v in variants if not v.sweep]
    jobs += [(v, seed) for v in variants if v.sweep for seed in run_seeds(v, s, base.seed)]
    for i, (variant, seed) in enumerate([] if report_only else jobs, 1):
        run = variant.run_dir(out, seed)
        cfg = run_config(base, variant, seed, s.steps, 0 if variant.sweep else s.time_every)
        began = time.time()
        print(f"ablate: [{i}/{len(jobs)}] {run.name}: captions {variant.mix}, seed {seed}, {s.steps} steps",
              flush=True)
        did_train = train_run(cfg, set_dir, run)
        evaluated = evaluate_run(run, variant.prompt_sets(), s, seed)
        if s.time_every and not variant.sweep:  # scores nothing until every arm of the seed is trained
            evaluated += evaluate_time_matched({v.name: v.run_dir(out, seed) for v in variants if not v.sweep}, s,
                                               seed)
        what = "finished earlier, skipped" if not (did_train or evaluated) else f"done in {time.time() - began:.0f} s"
        print(f"ablate: [{i}/{len(jobs)}] {run.name} {what}", flush=True)
        if (did_train or evaluated) and i < len(jobs):
            write_report(out, s, variants, base.seed, words, command)  # what is finished so far, readable meanwhile
    return write_report(out, s, variants, base.seed, words, command)
