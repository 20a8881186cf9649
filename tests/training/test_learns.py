"""The `tiny` preset learns the synthetic scenes on a CPU: loss falls well below its start, and images sampled from
the EMA weights parse back (`scenes.parse`) to the prompt's colour, position and shape well above chance.

    .venv/bin/pytest -m slow tests/training/test_learns.py -s        # ≈ 9 min on 2 cores; prints the scores
    LENSFORGE_LEARN_STEPS=1800 .venv/bin/pytest -m slow tests/training/test_learns.py -s   # longer: better shapes

CPU-RECIPES.md's measured recipe: 32² images, pixel-unshuffle 4 → 64 tokens × 48 channels, batch 64, LR 2e-3 with
100 warm-up steps, x-prediction with the velocity loss (t clamped at 0.05 in `inference.flow`), AdamW (0.9, 0.95)
without weight decay, clip 1, EMA 0.995, 10 % caption dropout; sampling Euler 25 steps with CFG 4. The data: 4,096
one-object scenes (a large shape of 4, one of 8 colours, in one of 9 cells, on one of 3 backgrounds) with dense
captions; the prompts are 64 other scenes. Chance: colour 1/8, position 1/9, shape 1/4 (balanced recall, since a
shapeless blob reads as a circle).
"""

import json
import os
import random
from collections import defaultdict

import pytest

from inference.checkpoint import resolve_checkpoint
from inference.generate import Pipeline
from scenes import describe, parse
from training.train_config import TrainConfig
from training.trainer import Trainer

STEPS = int(os.environ.get("LENSFORGE_LEARN_STEPS", 1000))
RECIPE = {
    "preset": "tiny", "model": {"prediction": "x"},
    "data": {"batch_size": 64, "caption_dropout": 0.1},
    "optim": {"lr": 2e-3, "warmup_steps": 100, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0},
    "ema": {"decay": 0.995}, "log_every": 10, "checkpoint_every": 10_000, "progress": False,
}


def score(run=None, checkpoint=None, prompts: int = 64, seed: int = 12345) -> dict:
    """Sample each prompt once from the EMA weights (a run's latest step, or one step directory), parse the
    image, and score it against the prompt."""
    from scenes.shards import one_object_scene

    rng = random.Random(seed)
    scenes = [one_object_scene(rng) for _ in range(prompts)]
    weights, spec = resolve_checkpoint(run=run, checkpoint=checkpoint)  # EMA preferred
    assert weights.name == "ema.safetensors"
    images = Pipeline.load(weights, spec).generate([describe(s, "dense") for s in scenes], 32, 32, steps=25,
                                                   cfg=4.0, seeds=list(range(prompts)), batch_size=16)
    colour = position = background = 0
    shape_hits: dict[str, list[bool]] = defaultdict(list)
    for scene, image in zip(scenes, images):
        want, got = scene.objects[0], parse(image)
        in_cell = [o for o in got.objects if o.cell == want.cell]
        obj = in_cell[0] if in_cell else (got.objects[0] if got.objects else None)
        colour += obj is not None and obj.color == want.color
        position += bool(in_cell)
        background += got.background == scene.background
        shape_hits[want.shape].append(bool(in_cell) and in_cell[0].shape == want.shape)
    recall = {s: sum(h) / len(h) for s, h in sorted(shape_hits.items())}
    return {"prompts": prompts, "colour": colour, "position": position, "background": background,
            "shape_balanced_recall": round(sum(recall.values()) / len(recall), 3), "shape_recall": recall}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tiny_learns_colour_position_and_shape(tmp_path_factory):
    from scenes.shards import cached_scene_shards, one_object_scene

    data = cached_scene_shards(tmp_path_factory, "one-object-4096", {(32, 32): 4096}, scene_fn=one_object_scene,
                               seed=1)
    run = tmp_path_factory.mktemp("learn") / "run"
    Trainer(TrainConfig.model_validate({**RECIPE, "max_steps": STEPS}), data, run).fit()
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    first, last = train[0]["loss"], train[-1]["loss"]
    result = score(run)
    s_per_step = sum(r["step_s"] for r in train) / len(train)
    print(f"\ntiny, {STEPS} steps at {s_per_step:.2f} s/step: loss {first:.3f} → {last:.3f}; {json.dumps(result)}")
    assert last < 0.2 * first
    n = result["prompts"]
    assert result["colour"] >= 0.6 * n  # chance 1/8
    assert result["position"] >= 0.6 * n  # chance 1/9
    assert result["shape_balanced_recall"] >= 0.4  # chance 0.25; measured 0.475 at 900 steps, 0.61 at 1200
