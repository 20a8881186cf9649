"""scenes/rubric.py: descriptions read back into their scenes, and rubric answers that a faithful render passes
and a wrong or empty one fails, question by question."""

import random

from scenes.adherence import prompt_set
from scenes.describe import describe
from scenes.parse import parse
from scenes.render import render
from scenes.rubric import STRUCTURE, answer, read_description, rubric_for
from scenes.scene import Obj, Scene, random_scene


def test_a_dense_or_medium_description_reads_back_into_its_scene():
    for k in range(200):
        scene = random_scene(random.Random(k), word_prob=0.0)
        if scene.objects:
            assert read_description(describe(scene, "dense")) == scene
            assert read_description(describe(scene, "medium")).objects == scene.objects
    assert read_description("a cat on a sofa") is None
    assert all(read_description(it.prompt) == it.scene for it in prompt_set(per_category=8, seed=1))


def test_a_faithful_render_answers_yes_to_its_whole_rubric():
    for it in prompt_set(per_category=6, seed=1):
        questions = rubric_for(it.scene)
        assert questions[-1] == STRUCTURE and len(questions) == len(set(questions))
        assert [answer(q, parse(render(it.scene, 32))) for q in questions] == [True] * len(questions)


def test_wrong_images_fail_the_questions_they_get_wrong():
    target = Scene((Obj("circle", "red", "large", "top left"), Obj("square", "blue", "large", "center")), "white")
    questions = rubric_for(target)
    assert questions == ["Is there a red circle?", "Is the red circle in the top left?", "Is there a blue square?",
                         "Is the blue square in the center?", "Are there exactly 2 objects?",
                         "Is the background white?", STRUCTURE]
    moved = Scene((Obj("circle", "red", "large", "bottom right"), Obj("square", "green", "large", "center")), "black")
    assert [answer(q, parse(render(moved, 32))) for q in questions] == [True, False, False, False, True, False, True]
    empty = parse(render(Scene(background="white"), 32))
    assert [answer(q, empty) for q in questions] == [False, False, False, False, False, True, False]
    assert answer("Is it beautiful?", empty) is None
    assert answer("Is there exactly 1 object?", parse(render(Scene((target.objects[0],)), 32))) is True


def test_a_rich_description_reads_back_as_its_basic_scene():
    rng = random.Random(4)
    for _ in range(100):
        scene = random_scene(rng, world="rich")
        plain = [(o.shape, o.color, o.size, o.cell) for o in scene.objects]
        for style in ("dense", "medium"):
            read = read_description(describe(scene, style))
            assert [(o.shape, o.color, o.size, o.cell) for o in read.objects] == plain
        assert read_description(describe(scene, "dense")).background == scene.background
        parsed = parse(render(scene, 32), world="rich")
        assert all(answer(q, parsed) for q in rubric_for(scene))
