"""The prompt-adherence evaluator: a fixed prompt set, rules that pass the true renders and not unrelated images,
bootstrap intervals, the shuffled-prompt chance, and `lensforge evaluate` on a random checkpoint.

    .venv/bin/pytest tests/scenes/test_adherence.py -s      # prints the measured tables
"""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from scenes.adherence import (
    CATEGORIES, MAX_COUNT, RICH_CATEGORIES, SHAPE_PAIRS, categories_for, evaluate, passes, prompt_set, score,
)
from scenes.adherence_report import bootstrap
from scenes.describe import describe
from scenes.render import render
from scenes.scene import CELLS, COLORS, FRAMES, SHAPES, WORDS, Obj, Scene, random_scene


def _jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def items():
    return prompt_set()  # the default set: 32 dense prompts per category


def test_prompt_set_is_fixed_and_each_category_has_its_structure():
    items = prompt_set(per_category=24)
    assert items == prompt_set(per_category=24)
    prefix = [it for c in CATEGORIES for it in [i for i in items if i.category == c][:12]]
    assert prompt_set(per_category=12) == prefix  # a longer set extends a shorter one
    assert prompt_set(per_category=24, seed=1) != items
    assert [it.category for it in items] == [c for c in CATEGORIES for _ in range(24)]
    by = {c: [it.scene for it in items if it.category == c] for c in CATEGORIES}
    for it in items:
        assert it.prompt == describe(it.scene, "dense")
        assert it.scene.word is None and all(o.size == "large" for o in it.scene.objects)
    # the tested attribute cycles over its values: every value asked equally often
    assert Counter(s.objects[0].shape for s in by["single_object"]) == {s: 6 for s in SHAPES}
    assert Counter(s.objects[0].color for s in by["colors"][:16]) == {c: 2 for c in COLORS}
    assert Counter(s.objects[0].cell for s in by["position"][:18]) == {c: 2 for c in CELLS}
    assert Counter(len(s.objects) for s in by["counting"]) == {n: 6 for n in range(1, MAX_COUNT + 1)}
    for name in ("two_objects", "color_attribution"):
        pairs = Counter(tuple(sorted(o.shape for o in s.objects)) for s in by[name])
        assert pairs == {tuple(sorted(p)): 4 for p in SHAPE_PAIRS}
    assert all(len({o.color for o in s.objects}) == 2 for s in by["color_attribution"])
    assert all(len(s.objects) == 1 for c in ("single_object", "colors", "position") for s in by[c])
    # a model is asked in its own caption style
    short = prompt_set(per_category=3, style="short")
    assert [it.scene for it in short] == [it.scene for it in prompt_set(per_category=3)]
    assert all(it.prompt == describe(it.scene, "short") for it in short)
    for kwargs, match in (({"per_category": 0}, "per_category"), ({"style": "poem"}, "caption style"),
                          ({"categories": ["spatial"]}, "unknown category")):
        with pytest.raises(ValueError, match=match):
            prompt_set(**kwargs)


def test_rules_check_what_their_names_say():
    red_circle, blue_square = Obj("circle", "red", "large", "top left"), Obj("square", "blue", "large", "center")
    target = Scene((red_circle, blue_square))
    swapped = Scene((Obj("circle", "blue", "large", "top left"), Obj("square", "red", "large", "center")))
    assert passes("two_objects", target, swapped) and not passes("color_attribution", target, swapped)
    assert passes("color_attribution", target, Scene((blue_square, red_circle)))
    extra = Scene((red_circle, blue_square, Obj("star", "green", "large", "bottom right")))
    one = Scene((red_circle,))
    assert passes("position", one, extra) and passes("colors", one, extra) and not passes("counting", one, extra)
    moved = Scene((Obj("circle", "red", "large", "center"),))
    assert passes("single_object", one, moved) and passes("colors", one, moved)
    assert not passes("position", one, moved) and not passes("single_object", one, Scene((blue_square,)))
    assert not any(passes(c, one, Scene()) for c in CATEGORIES)


def test_true_renders_pass_every_category(items):
    renders = [render(it.scene, 32) for it in items]
    for images, label in ((renders, "32²"), ([_jpeg(im) for im in renders], "32² JPEG q90")):
        result = score(items, images)
        print(f"\nground truth, {label}:\n{result.to_markdown()}")
        for c in result.categories:
            assert c.score.mean >= 0.95, (label, c)
            assert c.chance.high < 0.5  # the same images against other prompts
        assert result.overall.mean >= 0.98


def test_unrelated_images_score_about_chance(items):
    rng = random.Random(99)
    others = [render(random_scene(rng, 1, 4, word_prob=0.0), 32) for _ in items]
    noise = list(np.random.default_rng(0).integers(0, 256, (len(items), 32, 32, 3), dtype=np.uint8))
    for images, label in ((others, "other scenes"), (noise, "uniform noise")):
        result = score(items, images)
        print(f"\n{label}:\n{result.to_markdown()}")
        assert result.overall.mean < 0.45
        # unrelated images score what they score against shuffled prompts, within the interval
        assert result.overall.low <= result.chance.mean <= result.overall.high
    # noise paints every cell: position passes by construction, counting never does; the chance column says so
    assert result.category("position").score.mean == result.category("position").chance.mean == 1.0
    assert result.category("counting").score.mean == 0.0


def test_intervals_contain_the_estimate_and_shrink_with_more_items(items):
    # true renders for half the items, an empty canvas for the rest: ~50 % in every category
    images = [render(it.scene if k % 2 else Scene(background=it.scene.background), 32) for k, it in enumerate(items)]
    result = score(items, images)
    for est in [c.score for c in result.categories] + [c.chance for c in result.categories] + [result.overall]:
        assert est.low <= est.mean <= est.high
    assert all(c.score.mean == 0.5 and c.score.high - c.score.low > 0.2 for c in result.categories)
    assert result.overall.high - result.overall.low < min(c.score.high - c.score.low for c in result.categories)
    widths = []
    for n in (16, 64, 256):
        hits = {c: np.arange(n) % 2 for c in CATEGORIES}
        per_category, overall = bootstrap(hits)
        assert overall.mean == 0.5 and all(e.low <= 0.5 <= e.high for e in per_category.values())
        widths.append(per_category["counting"].high - per_category["counting"].low)
    assert widths[0] > 1.6 * widths[1] > 1.6 * 1.6 * widths[2]  # ~ 1 / sqrt(n)
    assert bootstrap(hits) == bootstrap(hits)  # a fixed seed


def test_result_is_json_and_a_table(items):
    small = prompt_set(per_category=4)
    result = score(small, [render(it.scene, 32) for it in small])
    data = json.loads(json.dumps(result.to_dict()))
    assert list(data["categories"]) == list(CATEGORIES) and data["overall"]["mean"] == 1.0
    assert data["categories"]["counting"] == {"n": 4, "passed": 4, "score": {"mean": 1.0, "ci95": [1.0, 1.0]},
                                              "chance": data["categories"]["counting"]["chance"]}
    assert len(data["items"]) == len(small) and data["items"][0]["parsed"] == small[0].scene.to_dict()
    table = result.to_markdown()
    assert all(f"| {c} | 4 | 4 | 1.000 (1.000–1.000) |" in table for c in CATEGORIES)
    one = score(small[:1], [render(small[0].scene, 32)])  # one item: no prompt to shuffle against
    assert one.category("single_object").chance is None and one.chance is None and "| – |" in one.to_markdown()
    with pytest.raises(ValueError, match="2 images"):
        score(small[:1], [render(small[0].scene, 32)] * 2)


def test_evaluate_asks_the_generator_and_scores_at_one_size():
    items = prompt_set(per_category=3)
    calls = []

    def generate(prompts, seeds):  # a perfect model that draws at 96²
        calls.append((prompts, seeds))
        by_prompt = {it.prompt: it.scene for it in items}
        return [np.asarray(render(by_prompt[p], 96)) for p in prompts]

    result = evaluate(generate, items, size=32, seed=5)
    assert calls == [([it.prompt for it in items], list(range(5, 5 + len(items))))]
    assert result.overall.mean == 1.0
    with pytest.raises(ValueError, match="returned 1 images"):
        evaluate(lambda prompts, seeds: generate(prompts[:1], seeds[:1]), items)


def test_evaluate_command_on_a_random_checkpoint(tmp_path, monkeypatch, capsys):
    from inference.checkpoint import CheckpointSpec, save_random_checkpoint
    from inference.config import get_preset
    from pipelines import cli

    # the same tiny random checkpoint as tests/inference/test_generate.py's run_dir
    spec = CheckpointSpec(model=get_preset("tiny").model_copy(update={"depth": 2}), codec="pixel",
                          text_encoder="minilm")
    run = tmp_path / "run"
    save_random_checkpoint(run / "checkpoints" / "step_00000001", spec, seed=1)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["evaluate"])
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--run", str(run), "--out", str(out), "--per-category", "2", "--steps", "2",
                     "--style", "tags", "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "adherence.json").read_text())
    assert list(data["categories"]) == list(CATEGORIES)
    assert all(data["categories"][c]["n"] == 2 for c in CATEGORIES)
    assert data["settings"]["checkpoint"].endswith("step_00000001/ema.safetensors")
    assert (data["settings"]["style"], data["settings"]["size"], data["settings"]["steps"]) == ("tags", 32, 2)
    assert data["items"][0]["prompt"] == prompt_set(per_category=2, style="tags")[0].prompt
    assert "| **overall**" in (out / "adherence.md").read_text()
    assert Image.open(out / "samples_counting.png").size == (64, 32)
    assert cli.main(["evaluate", "--run", str(run), "--out", str(out), "--per-category", "0"]) == 2
    assert "--per-category must be ≥ 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def rich_items():
    return prompt_set(world="rich")  # 32 dense prompts per category, the six basic ones and the five rich ones


def test_rich_prompt_set_structure(rich_items):
    assert categories_for("basic") == CATEGORIES and categories_for("rich") == CATEGORIES + RICH_CATEGORIES
    assert [it.category for it in rich_items] == [c for c in categories_for("rich") for _ in range(32)]
    assert prompt_set(per_category=4, world="rich") == [it for c in categories_for("rich")
                                                         for it in [i for i in rich_items if i.category == c][:4]]
    by = {c: [it.scene for it in rich_items if it.category == c] for c in categories_for("rich")}
    for it in rich_items:  # a rich target is a rich scene its own dense caption describes
        assert it.scene.world == "rich" and it.prompt == describe(it.scene, "dense")
    assert {o.fill for c in CATEGORIES for s in by[c] for o in s.objects} == {"solid", "hollow"}
    assert Counter((s.objects[0].shape, s.objects[0].fill) for s in by["texture"]) == {
        (shape, fill): 4 for shape in SHAPES for fill in ("solid", "hollow")}
    assert all(sorted(o.size for o in s.objects) == ["large", "small"] for s in by["relative_size"])
    assert all(len({o.color for o in s.objects}) == 2 and len({o.shape for o in s.objects}) == 2
               for c in ("relative_size", "relations") for s in by[c])
    kinds = Counter((CELLS[a.cell][0] == CELLS[b.cell][0], CELLS[a.cell][1] == CELLS[b.cell][1])
                    for a, b in (s.objects for s in by["relations"]))
    assert kinds == {(True, False): 11, (False, True): 11, (False, False): 10}  # row, column, diagonal
    assert Counter(s.word_cell for s in by["text"][:18]) == {c: 2 for c in CELLS}
    assert Counter(s.word for s in by["text"][:24]) == {w: 2 for w in WORDS}
    assert Counter(s.frame for s in by["frame"]) == {f: 8 for f in FRAMES}
    with pytest.raises(ValueError, match="unknown category 'texture' in the basic world"):
        prompt_set(categories=["texture"])


def test_rich_rules_check_what_their_names_say():
    def scene(*objects, **kw):
        return Scene(objects, world="rich", **kw)

    circle, star = Obj("circle", "red", "large", "top left", "hollow"), Obj("star", "blue", "small", "bottom right")
    target = scene(circle, star)
    assert passes("texture", target, scene(Obj("circle", "green", "large", "center", "hollow")))
    assert not passes("texture", target, scene(Obj("circle", "red", "large", "top left")))
    assert passes("relative_size", target, scene(circle, star))
    swapped = scene(Obj("circle", "red", "small", "top left"), Obj("star", "blue", "large", "bottom right"))
    assert not passes("relative_size", target, swapped) and passes("relations", target, swapped)
    moved = scene(Obj("circle", "red", "large", "bottom left"), Obj("star", "blue", "small", "bottom right"))
    assert not passes("relations", target, moved)  # now level with, not above
    assert passes("relations", scene(Obj("circle", "red", "large", "center"), Obj("star", "blue", "large", "top left")),
                  scene(Obj("circle", "red", "large", "bottom right"), Obj("star", "blue", "large", "center")))
    text = scene(circle, word="CAT", word_at="center")
    assert passes("text", text, scene(word="CAT", word_at="center"))
    assert not passes("text", text, scene(word="DOG", word_at="center"))
    assert not passes("text", text, scene(word="CAT", word_at="top right"))
    framed = scene(circle, frame="green")
    assert passes("frame", framed, scene(frame="green")) and not passes("frame", framed, scene(frame="red"))
    assert not any(passes(c, target, Scene(world="rich")) for c in ("texture", "relative_size", "relations"))


def test_rich_true_renders_pass_every_category(rich_items):
    result = score(rich_items, [render(it.scene, 32) for it in rich_items])
    print(f"\nrich ground truth, 32²:\n{result.to_markdown()}")
    for c in result.categories:
        assert c.score.mean >= 0.95, c
        assert c.chance.high < 0.5
    assert [c.category for c in result.categories] == list(categories_for("rich"))


def test_rich_unrelated_images_score_about_chance(rich_items):
    rng = random.Random(99)
    others = [render(random_scene(rng, world="rich"), 32) for _ in rich_items]
    noise = list(np.random.default_rng(0).integers(0, 256, (len(rich_items), 32, 32, 3), dtype=np.uint8))
    for images, label in ((others, "other rich scenes"), (noise, "uniform noise")):
        result = score(rich_items, images)
        print(f"\n{label}:\n{result.to_markdown()}")
        assert result.overall.mean < 0.3
        assert result.overall.low <= result.chance.mean <= result.overall.high
        for c in result.categories:  # no category stands far above its own chance level
            assert c.score.mean <= c.chance.high + 0.2, (label, c)
