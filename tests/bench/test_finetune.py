"""bench/finetune.py: the new distribution it draws and scores, and the whole measurement in its --quick mode (48
scenes a data set, 3 steps a run, one prompt a category), so the script does not rot between real measurements."""

import json
import math
import random

import pytest

from bench import finetune
from bench.report import ENV
from scenes.adherence import CATEGORIES, prompt_set


def test_the_new_distribution_is_the_demos_scenes_on_one_background():
    make = finetune.scene_maker("gray")
    scenes = [make(random.Random(k)) for k in range(50)]
    assert {s.background for s in scenes} == {"gray"}
    assert {len(s.objects) for s in scenes} == {1, 2, 3} and not any(s.word for s in scenes)  # configs/demo.yaml
    default = [finetune.scene_maker(None)(random.Random(k)) for k in range(50)]
    assert {s.background for s in default} == {"white", "gray", "black"}
    assert [s.objects for s in default] == [s.objects for s in scenes]  # the same draw, only moved


def test_new_prompts_are_the_evaluate_prompts_moved_onto_the_background():
    items, moved = prompt_set(per_category=3), finetune.new_items(3, "black")
    assert [it.category for it in moved] == [it.category for it in items]
    assert [it.scene.objects for it in moved] == [it.scene.objects for it in items]
    assert all(it.scene.background == "black" and "plain black background" in it.prompt for it in moved)


@pytest.mark.slow  # ≈ 75 s on 2 shared cores: six `lensforge` processes
def test_quick_measurement_reports_full_and_lora(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    out = tmp_path / "finetune"
    assert finetune.main(["--out", str(out), "--quick"]) == 0
    result = json.loads((out / "finetune.json").read_text())
    for distribution in ("new", "default"):
        tables = result["adherence"][distribution]
        assert set(tables) == {"base", "full", "lora"}
        for table in tables.values():
            assert [*table] == [*CATEGORIES, "background", "overall", "chance"]
            for estimate in (e for e in table.values() if e is not None):  # chance: None at one prompt a category
                low, high = estimate["ci95"]
                assert all(math.isfinite(x) for x in (estimate["mean"], low, high))
                assert 0 <= low <= estimate["mean"] <= high <= 1
    full, lora = result["costs"]["full"], result["costs"]["lora"]
    assert (full["weights_file"], lora["weights_file"]) == ("model.safetensors", "adapter.safetensors")
    assert 0 < lora["weights_bytes"] < full["weights_bytes"] and 0 < lora["parameters"] < full["parameters"]
    assert 0 < lora["step_dir_bytes"] < full["step_dir_bytes"]
    assert all(0 < result["costs"][r]["median_step_s"] < math.inf for r in ("base", "full", "lora"))
    report = (out / "finetune.md").read_text()
    assert "| full fine-tune | model.safetensors |" in report and "| LoRA r 8 | adapter.safetensors |" in report
    figures = [json.loads(line)["figure"] for line in rows.read_text().splitlines()]
    assert figures[0] == "LoRA r 8 adapter.safetensors" and len(figures) == 4

    capsys.readouterr()
    assert finetune.main(["--out", str(out), "--quick"]) == 0  # the same command again: nothing to redo
    again = capsys.readouterr().out
    assert "finetune: lensforge" not in again and "-new: adherence" not in again
    with pytest.raises(SystemExit, match="trained otherwise"):
        finetune.main(["--out", str(out), "--quick", "--lora-rank", "4"])
