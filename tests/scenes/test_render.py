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


def _outer_cells_scene(fill: str, frame: str | None, word: str | None = None) -> Scene:
    """Large shapes in all eight outer cells (the word, if any, in the centre): every edge has an object near it."""
    shapes = (SHAPES * 2)[:8]
    outer = [c for c in CELLS if c != "center"]
    objects = tuple(Obj(s, "blue", "large", c, fill) for s, c in zip(shapes, outer))
    return Scene(objects, "white", word, frame=frame, world="rich")


@pytest.mark.parametrize("size", [32, 64, 256])
def test_rich_frame_is_a_ring_that_touches_no_object(size):
    band = round(size / 32)  # FRAME_WIDTH of the side
    for fill in ("solid", "hollow"):
        framed = np.asarray(render(_outer_cells_scene(fill, "red"), size)).astype(int)
        bare = np.asarray(render(_outer_cells_scene(fill, None), size)).astype(int)
        changed = np.abs(framed - bare).sum(-1) > 0
        inner = np.zeros_like(changed)
        inner[band:-band, band:-band] = True
        assert not (changed & inner).any(), (size, fill)  # the frame changes only the ring ...
        assert changed[~inner].all()  # ... all of it, in its colour
        assert np.abs(framed[0, size // 2] - COLORS["red"]).max() <= 2
        # and no object reaches into the ring: without a frame the ring is pure background
        assert np.abs(bare[~inner] - BACKGROUNDS["white"]).max() == 0


def test_rich_hollow_is_an_outline_of_the_same_shape():
    for shape in SHAPES:
        solid = Scene((Obj(shape, "green", "large", "center"),), "gray", world="rich")
        hollow = Scene((Obj(shape, "green", "large", "center", "hollow"),), "gray", world="rich")
        a, b = (np.asarray(render(s, 96)).astype(int) for s in (solid, hollow))
        drawn_a = np.abs(a - BACKGROUNDS["gray"]).sum(-1) > 30
        drawn_b = np.abs(b - BACKGROUNDS["gray"]).sum(-1) > 30
        assert not (drawn_b & ~drawn_a).any()  # the outline lies inside the solid shape
        assert 0.35 < drawn_b.sum() / drawn_a.sum() < 0.85, shape  # a hole, not a sliver or a dot
        assert solid.world == hollow.world == "rich"


def test_rich_word_stays_inside_its_cell_clear_of_the_frame():
    scene = Scene((Obj("circle", "red", "large", "center"),), "white", "HELLO", frame="green", word_at="middle left",
                  world="rich")
    base = Scene((Obj("circle", "red", "large", "center"),), "white", frame="green", world="rich")
    a, b = (np.asarray(render(s, 96)).astype(int) for s in (scene, base))
    changed = np.abs(a - b).sum(-1) > 0
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 32 and rows.max() < 64 and cols.max() < 32  # inside the middle-left cell
    assert cols.min() >= 0.038 * 96  # clear of the band the parser wipes (the frame is 1/32 of the side)
