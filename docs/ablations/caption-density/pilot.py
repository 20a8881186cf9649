"""The study's pilot: when does one arm's model start to draw the rich scenes? Trains ARM at BATCH for STEPS with a
checkpoint every 200 steps (the study's recipe otherwise: study.yaml), then scores the checkpoints at the steps
named on the dense prompts, as the study scores its models (pipelines/ablate_eval.py).

    .venv/bin/python docs/ablations/caption-density/pilot.py --data /tmp/abl/data --out /tmp/pilot \
        --arm dense --batch 32 --steps 1200 --score 400,800,1200          # about 14 minutes on 2 cores

Writes OUT/<arm>-b<batch>/ (the run, adherence-dense-step<N>.json, samples-dense-step<N>.png); rerun to resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipelines.ablate import AblateSettings, needed_variants, parse_variant, run_config, train_run
from pipelines.ablate_data import resolve_shard_set
from pipelines.ablate_eval import checkpoints, evaluate_checkpoint, eval_settings
from training.train_config import TrainConfig

STUDY = Path(__file__).with_name("study.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the study's data (lensforge demo ... --until precompute)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", default="dense")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--score", default="400,800,1200", help="steps to score (multiples of 200)")
    args = parser.parse_args()

    raw = yaml.safe_load(STUDY.read_text())["train"]
    raw["data"]["batch_size"], raw["progress"] = args.batch, False
    base = TrainConfig.model_validate(raw)
    s = AblateSettings(variants=[args.arm], steps=args.steps, world="rich", per_category=16)
    variant = parse_variant(args.arm)
    run = Path(args.out) / f"{variant.slug}-b{args.batch}"
    cfg = run_config(base, variant, seed=0, steps=args.steps, every=200)
    train_run(cfg, resolve_shard_set(args.data, base, needed_variants([variant]), STUDY), run)
    spec = {"style": "dense", "words": None, "own": None}
    for step, checkpoint in sorted(checkpoints(run).items()):
        name = f"adherence-dense-step{step}.json"
        if step in {int(x) for x in args.score.split(",")} and not (run / name).is_file():
            evaluate_checkpoint(run, checkpoint, {name: eval_settings(s, spec, 0, step)}, s)


if __name__ == "__main__":
    main()
