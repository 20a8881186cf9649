"""training/rl_prompts.py: prompt files as `lensforge rl` reads them (text or JSONL, bad lines named), the
`lensforge scenes prompts` file they come from, and the scenes rule reward on renders whose answer is known."""

import json

import pytest

from pipelines import cli
from scenes.adherence import CATEGORIES, prompt_set
from scenes.render import render
from scenes.scene import Scene
from training.rl_prompts import RLPrompt, SceneReward, read_prompts


def test_a_text_file_is_one_prompt_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  two blue squares  \n")
    assert read_prompts(path) == [RLPrompt("a red circle"), RLPrompt("two blue squares")]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "ok"', "prompts.jsonl:2: not JSON"),
    ('{"text": "no prompt field"}', 'non-empty "prompt"'),
    ('{"prompt": "x", "category": "spelling"}', "unknown category 'spelling'"),
    ('{"prompt": "x", "scene": {"objects": [{"shape": "blob"}]}}', 'unreadable "scene"'),
    ('{"prompt": "x", "rubric": "is it red?"}', '"rubric" must be a list'),
])
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_scenes_prompts_writes_held_apart_prompts_that_read_back_with_their_targets(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert cli.main(["scenes", "prompts", "--out", str(out), "--categories", "colors,position",
                     "--per-category", "5"]) == 0
    prompts = read_prompts(out)
    assert [p.category for p in prompts] == ["colors"] * 5 + ["position"] * 5
    expected = prompt_set(per_category=5, seed=1, categories=["colors", "position"])
    assert [(p.text, p.scene) for p in prompts] == [(it.prompt, it.scene) for it in expected]
    evaluated = {it.prompt for it in prompt_set(per_category=5)}  # lensforge evaluate's (seed 0)
    assert not evaluated & {p.text for p in prompts}
    assert json.loads(out.read_text().splitlines()[0])["scene"]["objects"]
    with pytest.raises(ValueError, match="a .jsonl file"):
        cli_args = ["scenes", "prompts", "--out", str(tmp_path / "train.txt")]
        from pipelines.commands.scenes import write_prompt_file

        write_prompt_file(cli.build_parser()[0].parse_args(cli_args))


def test_the_scenes_reward_is_the_adherence_rule_on_the_parsed_image():
    items = prompt_set(per_category=4, seed=1)
    prompts = [RLPrompt(it.prompt, it.category, it.scene) for it in items]
    reward = SceneReward()
    assert reward.score(prompts, [render(it.scene, 32) for it in items]) == [1.0] * len(items)  # the targets
    blank = reward.score(prompts, [render(Scene(background=it.scene.background), 32) for it in items])
    assert blank == [0.0] * len(items)  # an empty scene shows none of it (counting asks for ≥ 1 object)
    assert {p.category for p in prompts} == set(CATEGORIES)
    with pytest.raises(ValueError, match="lensforge scenes prompts"):
        reward.score([RLPrompt("a red circle")], [render(items[0].scene, 32)])
