"""The run's final samples: fixed prompts through the EMA weights of the latest checkpoint, and, on synthetic scene
data, their prompt-adherence score (`scenes.adherence`).

Writes RUN/samples/final/: one PNG per prompt (`000.png`, ...), `grid.png`, `prompts.json` and, with adherence,
`adherence.json` (per category and overall, with bootstrap 95 % intervals and the shuffled-prompt chance level).
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import write_json
from pipelines.run_config import GridConfig

FINAL_DIR = "samples/final"


def final_dir(train_dir: str | Path) -> Path:
    return Path(train_dir) / FINAL_DIR


def sample_grid(train_dir: str | Path, grid: GridConfig, train_cfg=None) -> dict:
    import torch

    from inference.checkpoint import resolve_checkpoint
    from inference.generate import Pipeline, make_grid

    weights, spec = resolve_checkpoint(run=train_dir)  # EMA weights when the run has them
    items = None
    if grid.adherence:
        from scenes.adherence import prompt_set

        items = prompt_set(per_category=grid.per_category)
        prompts = [item.prompt for item in items]
    else:
        prompts = grid.prompts or (train_cfg.sample.prompts if train_cfg is not None else [])
    if not prompts:
        raise ValueError("no prompts to sample: set run.sample.prompts or run.sample.adherence")
    size = grid.size or spec.model.base_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.load(weights, spec, device=device, autocast=torch.bfloat16 if device == "cuda" else None)
    images = pipe.generate(prompts, size, size, steps=grid.steps, cfg=grid.cfg,
                           seeds=[grid.seed + i for i in range(len(prompts))], batch_size=grid.batch_size)

    out = final_dir(train_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"{i:03d}.png")
    make_grid(images).save(out / "grid.png")
    write_json(out / "prompts.json", {"weights": str(weights), "size": size, "steps": grid.steps, "cfg": grid.cfg,
                                      "prompts": prompts})
    summary = {"images": len(images), "weights": str(weights)}
    if items is not None:
        from scenes.adherence import score

        result = score(items, images)
        write_json(out / "adherence.json", result.to_dict())
        (out / "adherence.md").write_text(result.to_markdown() + "\n")
        summary["adherence"] = round(result.overall.mean, 4)
        summary["chance"] = None if result.chance is None else round(result.chance.mean, 4)
        chance = "n/a" if result.chance is None else result.chance.text()
        print(f"sample: prompt adherence {result.overall.text()} (95 % CI), chance {chance}")
    return summary
