"""The scene records and their worlds: the basic world pinned to what it was before the rich one existed (scene,
captions, render hashes, prompt set), and the rich world's fields, validation, draws and JSON."""

import hashlib
import json
import random

import numpy as np
import pytest

from scenes.adherence import prompt_set
from scenes.describe import describe
from scenes.render import render
from scenes.scene import CELLS, FILLS, FRAMES, RICH_OBJECTS, WORDS, Obj, Scene, random_scene

# Computed from the code before the rich world was added: random.Random(2024), the 4th random_scene(rng, 1, 4,
# word_prob=0.5). These must never change: every basic data set, caption and evaluation depends on them.
GOLDEN_SCENE = {"objects": [{"shape": "star", "color": "yellow", "size": "small", "cell": "top center"},
                            {"shape": "triangle", "color": "red", "size": "large", "cell": "middle left"},
                            {"shape": "square", "color": "orange", "size": "large", "cell": "center"},
                            {"shape": "square", "color": "pink", "size": "large", "cell": "bottom center"}],
                "background": "white", "word": "FOX"}
GOLDEN_CAPTIONS = {
    "dense": "Four objects on a plain white background. A small yellow star in the top center. A large red triangle "
             "in the middle left. A large orange square in the center. A large pink square in the bottom center. In "
             'all: two squares, one triangle, one star. The word "FOX" is written in the bottom left.',
    "medium": "A small yellow star in the top center, a large red triangle in the middle left, a large orange square "
              'in the center, a large pink square in the bottom center and the word "FOX", on a white background.',
    "short": "A red triangle on a white background.",
    "tags": 'yellow star, red triangle, orange square, pink square, white background, text "FOX"',
}
GOLDEN_RENDERS = {
    32: "c39da718a62478b31e9bf404b4138b972720ecf6f708634f489192a09017ef7d",
    64: "dccc3c3e1db2a90c00f863bac661c9f9e54136c1436a0c2e66691fa5d7568c66",
    256: "3ef0ef97369b21fc8a9e39dc8b167a44a7f27185098f5a74b226f230d97692aa",
}
GOLDEN_PROMPTS = "ae5b73dc2e8748f1346c83b23b74d365e3439e96c8f4d26ef62ad9da535039f1"  # prompt_set(per_category=8)


def test_basic_world_is_unchanged():
    rng = random.Random(2024)
    scene = [random_scene(rng, 1, 4, word_prob=0.5) for _ in range(4)][3]
    assert json.dumps(scene.to_dict()) == json.dumps(GOLDEN_SCENE)  # same keys, same order
    assert Scene.from_dict(GOLDEN_SCENE) == scene and scene.world == "basic"
    for style, text in GOLDEN_CAPTIONS.items():
        assert describe(scene, style) == text
    for size, digest in GOLDEN_RENDERS.items():
        assert hashlib.sha256(np.asarray(render(scene, size)).tobytes()).hexdigest() == digest
    items = prompt_set(per_category=8)
    blob = json.dumps([[i.category, i.prompt, i.scene.to_dict()] for i in items]).encode()
    assert hashlib.sha256(blob).hexdigest() == GOLDEN_PROMPTS


def test_rich_json_adds_keys_only_when_not_default():
    plain = Scene((Obj("star", "red", "large", "center"),), "gray", world="rich")
    assert plain.to_dict() == {"objects": [{"shape": "star", "color": "red", "size": "large", "cell": "center"}],
                               "background": "gray", "word": None, "world": "rich"}
    full = Scene((Obj("star", "red", "large", "center", "hollow"),), "gray", "CAT", frame="blue", word_at="top left",
                 world="rich")
    data = full.to_dict()
    assert data["objects"][0]["fill"] == "hollow" and data["frame"] == "blue" and data["word_at"] == "top left"
    assert Scene.from_dict(json.loads(json.dumps(data))) == full
    old = {"objects": [{"shape": "circle", "color": "blue", "size": "small", "cell": "center"}], "background": "black"}
    assert Scene.from_dict(old) == Scene((Obj("circle", "blue", "small", "center"),), "black")


def test_rich_fields_are_validated():
    with pytest.raises(ValueError, match="only large objects can be hollow"):
        Obj("star", "red", "small", "center", "hollow")
    with pytest.raises(ValueError, match="unknown fill"):
        Obj("star", "red", "large", "center", "striped")
    with pytest.raises(ValueError, match="need world='rich'"):
        Scene(frame="red")
    with pytest.raises(ValueError, match="need world='rich'"):
        Scene((Obj("star", "red", "large", "center", "hollow"),))
    with pytest.raises(ValueError, match="unknown frame"):
        Scene(frame="white", world="rich")
    with pytest.raises(ValueError, match="word_at"):
        Scene((Obj("star", "red", "large", "center"),), word="CAT", word_at="center", world="rich")
    with pytest.raises(ValueError, match="unknown world"):
        Scene(world="fancy")
    # the default cell spelled out is the same scene as the default left implicit
    explicit = Scene(word="OK", word_at="bottom center", world="rich")
    assert explicit == Scene(word="OK", world="rich") and explicit.word_at is None


def test_rich_random_scenes():
    rng = random.Random(0)
    scenes = [random_scene(rng, world="rich") for _ in range(400)]
    assert all(s.world == "rich" for s in scenes)
    assert {len(s.objects) for s in scenes} == set(range(RICH_OBJECTS[0], RICH_OBJECTS[1] + 1))
    objects = [o for s in scenes for o in s.objects]
    assert {o.fill for o in objects} == set(FILLS) and all(o.size == "large" for o in objects if o.fill == "hollow")
    assert {s.frame for s in scenes} == {None, *FRAMES}
    with_word = [s for s in scenes if s.word]
    assert 0.45 < len(with_word) / len(scenes) < 0.75  # more often than basic's 0.2
    assert all(s.word in WORDS and s.word_cell not in {o.cell for o in s.objects} for s in with_word)
    assert len({s.word_cell for s in with_word}) == len(CELLS)  # any free cell, not only the default one
    assert all(Scene.from_dict(s.to_dict()) == s for s in scenes)
    assert random_scene(random.Random(3), world="rich") == random_scene(random.Random(3), world="rich")
    assert random_scene(np.random.default_rng(0), world="rich").world == "rich"
    with pytest.raises(ValueError, match="rich world has"):
        random_scene(rng, 4, 4, world="rich")
