import random

import numpy as np
import pytest

from scenes.render import render
from scenes.scene import BACKGROUNDS, CELLS, COLORS, SHAPES, Obj, Scene, random_scene


def test_render_is_deterministic_and_sized():
    scene = random_scene(random.Random(7), 3, 4, word_prob=1.0)
    for size in (256, 64, 32):
        a, b = render(scene, size), render(scene, size)
        assert a.mode == "RGB" and a.size == (size, size)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_32_render_matches_area_downscale_of_256():
    scene = Scene((Obj("star", "red", "large", "center"), Obj("circle", "blue", "small", "top left")), "white")
    small = np.asarray(render(scene, 32)).astype(int)
    big = np.asarray(render(scene, 256)).astype(int).reshape(32, 8, 32, 8, 3).mean(axis=(1, 3))
    assert np.abs(small - big).max() <= 2


def test_objects_stay_in_their_cells_and_word_in_an_empty_one():
    scene = Scene((Obj("square", "green", "large", "center"),), "black", word="HELLO")
    pixels = np.asarray(render(scene, 90)).astype(int)
    bg = np.array(BACKGROUNDS["black"])
    changed = np.abs(pixels - bg).sum(-1) > 30
    cells_touched = {(r, c) for r in range(3) for c in range(3)
                     if changed[r * 30:(r + 1) * 30, c * 30:(c + 1) * 30].any()}
    assert cells_touched == {CELLS["center"], CELLS[scene.word_cell]}
    assert scene.word_cell == "bottom center"


def test_random_scene_respects_limits_and_round_trips():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, 2, 4, 0.5)
        assert 2 <= len(scene.objects) <= 4
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert Scene.from_dict(scene.to_dict()) == scene
    assert len(SHAPES) >= 4 and len(COLORS) >= 8 and len(BACKGROUNDS) >= 3
    assert not set(BACKGROUNDS) & set(COLORS)


def test_random_scene_accepts_numpy_generator():
    scene = random_scene(np.random.default_rng(0), 1, 4, 0.2)
    assert 1 <= len(scene.objects) <= 4


def test_bad_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        Obj("hexagon", "red", "large", "center")
    with pytest.raises(ValueError, match="share a cell"):
        Scene((Obj("star", "red", "large", "center"), Obj("circle", "red", "small", "center")))
