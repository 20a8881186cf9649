"""bench/rl.py in its --quick mode (2 tiny steps a reward, two prompts a category) on a random tiny model, so the
script that makes docs/rl/ does not rot between real measurements."""

import json

import pytest

from bench import rl
from bench.report import ENV


@pytest.mark.slow  # ≈ 1.5 min on 2 shared cores: eight `lensforge` processes
def test_quick_measurement_tables_both_rewards_before_and_after(tmp_path, monkeypatch, capsys):
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset

    init = tmp_path / "init"
    save_random_checkpoint(init / "checkpoints" / "step_00000000",
                           CheckpointSpec(model=get_preset("tiny").model_copy(update={"prediction": "x"})))
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(ENV, str(rows))
    out = tmp_path / "out"
    args = ["--init", str(init), "--out", str(out), "--quick"]
    assert rl.main(args) == 0
    result = json.loads((out / "rl.json").read_text())
    assert list(result["models"]) == ["init", "init (demo sampler)", "rl-scenes", "rl-judge"]
    assert result["held_out"] == ["counting", "position"]
    for name in ("rl-scenes", "rl-judge"):
        m = result["models"][name]
        assert m["steps"] == 2 and m["cfg"] == 1.0  # the quick rollouts' sampler, which the run records
        for part in ("trained", "held_out"):
            low, high = m[f"{part}_change"]["ci95"]
            assert low <= m[f"{part}_change"]["mean"] <= high
    judge = result["runs"]["judge"]
    assert judge["judge_requests"] > 0 and judge["judge_usd"] > 0
    assert list(result["trajectory"]["scenes"]) == ["1", "2"] and (out / "trajectory.png").is_file()
    assert (out / "grids" / "rl-judge-counting.png").is_file() and (out / "grids" / "init-two_objects.png").is_file()
    assert "| rl-judge | 2, 1 |" in (out / "rl.md").read_text()
    assert len([json.loads(line) for line in rows.read_text().splitlines()]) == 4

    capsys.readouterr()
    assert rl.main(args) == 0  # the same command again: the runs are finished, the evaluations kept
    assert "lensforge evaluate" not in capsys.readouterr().out
