"""bench/distill.py in its --quick mode (2 tiny steps a variant, one prompt a category) on a random tiny teacher, so
the script that makes docs/distill/ does not rot between real measurements."""

import json

import pytest

from bench import distill
from bench.report import ENV


@pytest.mark.slow  # ≈ 1 min on 2 shared cores: four `lensforge` processes
def test_quick_measurement_tables_the_teacher_and_the_student(tmp_path, monkeypatch, tmp_path_factory, capsys):
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset
    from scenes.shards import cached_scene_shards

    teacher = tmp_path / "teacher"
    save_random_checkpoint(teacher / "checkpoints" / "step_00000000",
                           CheckpointSpec(model=get_preset("tiny").model_copy(update={"prediction": "x"})))
    data = cached_scene_shards(tmp_path_factory, "distill", {(32, 32): 32}, shard_size=8)
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    out = tmp_path / "out"
    args = ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--variants", "full", "--quick"]
    assert distill.main(args) == 0
    result = json.loads((out / "distill.json").read_text())
    models = result["models"]
    assert list(models) == ["teacher-25", "teacher-4", "student-full"]
    assert [(m["steps"], m["cfg"], m["passes"]) for m in models.values()] == [(25, 4.0, 50), (4, 4.0, 8), (4, 1.0, 4)]
    assert all(0 <= m["adherence"]["mean"] <= 1 and m["s_per_image"] > 0 for m in models.values())
    assert result["runs"]["full"]["steps"] == 2 and (out / "grids" / "student-full.png").is_file()
    assert list(result["trajectory"]) == ["2"] and (out / "trajectory.png").is_file()  # its one checkpoint
    assert "| student-full | 4 | 1 |" in (out / "distill.md").read_text()
    found = [json.loads(line) for line in rows.read_text().splitlines()]
    assert found[-1]["ratio"] == 4 / 50 and len(found) == 3

    capsys.readouterr()
    assert distill.main(args) == 0  # the same command again: the run is finished, the evaluations kept
    assert "lensforge evaluate" not in capsys.readouterr().out
