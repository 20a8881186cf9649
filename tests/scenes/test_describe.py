import random

import pytest

from scenes.describe import alt, describe, position, reference, relation
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


def _rich(n=300, seed=21):
    rng = random.Random(seed)
    return [random_scene(rng, world="rich") for _ in range(n)]


def test_rich_dense_runs_80_to_120_words():
    counts = [len(describe(scene, "dense").split()) for scene in _rich()]
    print(f"rich dense words: {min(counts)}-{max(counts)}, mean {sum(counts) / len(counts):.0f}")
    assert min(counts) >= 80 and max(counts) <= 120


def test_rich_dense_names_everything():
    for scene in _rich(100):
        text = describe(scene, "dense")
        for obj in scene.objects:
            assert f"{obj.size} {obj.fill} {obj.color} {obj.shape} {position(obj.cell)}." in text
        assert f"on a plain {scene.background} background" in text
        for a, b in zip(scene.objects, scene.objects[1:]):
            assert f"{reference(a, scene.objects)} is {relation(a, b)} {reference(b, scene.objects)}." in text.lower()
        if scene.word:
            assert f'The word "{scene.word}" is written' in text and position(scene.word_cell) in text
        else:
            assert "There is no writing" in text
        assert (f"A thin {scene.frame} border" in text) if scene.frame else ("has no border" in text)
        assert text.count("In all:") == 1


def test_rich_dense_example():
    scene = Scene((Obj("circle", "red", "large", "top left", "hollow"), Obj("star", "blue", "small", "center"),
                   Obj("circle", "red", "small", "bottom right")), "gray", "SUN", frame="yellow",
                  word_at="top right", world="rich")
    assert describe(scene, "dense") == (
        "Three objects on a plain gray background. A large hollow red circle in the top left. A small solid blue star "
        "in the center. A small solid red circle in the bottom right. The first red circle is above and left of the "
        "blue star. The blue star is above and left of the second red circle. The first red circle is the only large "
        "object. In all: two circles and one star; two solid objects and one hollow object. The word \"SUN\" is "
        "written in small black capital letters in the top right. A thin yellow border runs around all four edges of "
        "the image. Apart from these, the gray background is flat and empty.")
    assert describe(scene, "short") == "A hollow red circle on a gray background."
    assert describe(scene, "tags") == ('hollow red circle, solid blue star, solid red circle, gray background, '
                                       'yellow border, text "SUN"')
    assert describe(scene, "medium") == (
        "A large hollow red circle in the top left, a small solid blue star in the center, a small solid red circle "
        'in the bottom right and the word "SUN" in the top right, on a gray background with a thin yellow border.')
    row = Scene((Obj("square", "green", "large", "middle left"), Obj("star", "pink", "large", "middle right")),
                world="rich")
    assert "The green square is directly left of the pink star." in describe(row, "dense")
    assert "The two objects are exactly the same size." in describe(row, "dense")


@pytest.mark.parametrize("style", ["dense", "medium", "short", "tags"])
def test_rich_word_budget_keeps_whole_sentences_by_priority(style):
    for scene in _rich(50):
        full = describe(scene, style)
        for budget in (1, 9, 30, 60, 200):
            text = describe(scene, style, max_words=budget)
            assert 0 < len(text.split()) <= budget
            if style == "dense" and budget >= 9:  # whole sentences of the full text, objects first
                assert all(f"{sentence}." in full for sentence in text.rstrip(".").split(". "))
                first = scene.objects[0]
                assert f"{first.size} {first.fill} {first.color} {first.shape}" in text
        assert describe(scene, style, max_words=200) == full
