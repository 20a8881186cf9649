import random

import pytest

from scenes.describe import alt, describe, position
from scenes.scene import COLORS, Obj, Scene, random_scene


def _scenes(n=100):
    rng = random.Random(11)
    return [random_scene(rng, 1, 4, word_prob=0.5) for _ in range(n)]


def test_dense_names_every_object_background_and_word():
    for scene in _scenes():
        text = describe(scene, "dense")
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape} {position(obj.cell)}" in text
        assert scene.background in text
        if scene.word:
            assert f'The word "{scene.word}" is written' in text


def test_dense_counts():
    scene = Scene((Obj("star", "red", "large", "top left"), Obj("star", "red", "small", "center"),
                   Obj("circle", "blue", "small", "bottom right")), "gray")
    text = describe(scene, "dense")
    assert text.startswith("Three objects on a plain gray background.")
    assert "two stars" in text and "one circle" in text and "Two objects are red" in text


def test_short_is_one_sentence_about_the_salient_object():
    scene = Scene((Obj("star", "red", "small", "top left"), Obj("square", "blue", "large", "center")), "white")
    assert describe(scene, "short") == "A blue square on a white background."
    for scene in _scenes():
        assert describe(scene, "short").count(".") == 1


def test_tags_and_medium():
    scene = Scene((Obj("triangle", "orange", "large", "center"),), "black", word="CAT")
    assert describe(scene, "tags") == 'orange triangle, black background, text "CAT"'
    expected = 'A large orange triangle in the center and the word "CAT", on a black background.'
    assert describe(scene, "medium") == expected


@pytest.mark.parametrize("style", ["dense", "medium", "short", "tags"])
def test_word_budget_is_respected_and_keeps_whole_objects(style):
    for scene in _scenes(50):
        for budget in (1, 5, 9, 15, 30):
            text = describe(scene, style, max_words=budget)
            assert 0 < len(text.split()) <= budget
        if style == "dense":  # 9 words fit the first object's whole sentence
            first = scene.objects[0]
            expected = f"A {first.size} {first.color} {first.shape} {position(first.cell)}."
            assert describe(scene, style, max_words=9) == expected


def test_unknown_style_is_a_value_error():
    with pytest.raises(ValueError, match="unknown caption style"):
        describe(Scene(), "poem")


def test_alt_is_weak_and_deterministic():
    scenes = _scenes(400)
    texts = [alt(s, random.Random(i)) for i, s in enumerate(scenes)]
    assert texts == [alt(s, random.Random(i)) for i, s in enumerate(scenes)]
    empty = sum(t == "" for t in texts) / len(texts)
    assert 0.08 < empty < 0.25

    def faithful(scene, text):  # names some object's shape, and its colour unless it names no colour at all
        return any(o.shape in text and (o.color in text or not any(c in text for c in COLORS)) for o in scene.objects)

    wrong = sum(bool(t) and not faithful(s, t) for s, t in zip(scenes, texts)) / len(texts)
    assert 0.05 < wrong < 0.35
