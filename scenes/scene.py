"""The scene world's vocabulary and its two record types, `Obj` and `Scene`.

This module is the one owner of the vocabulary (shapes, colours, sizes, cells, backgrounds, words): the renderer,
the parser, the describer and the prompt-adherence evaluator all import it from here.

    from scenes.scene import random_scene
    scene = random_scene(random.Random(0), min_objects=1, max_objects=4, word_prob=0.2)
    rich = random_scene(random.Random(0), world="rich")     # fills, a frame, more words: 80-120-word dense captions

Two worlds. "basic" is the original one and stays exactly as it was (same draws for the same seed, same JSON).
"rich" adds what real dense captions spend words on: a fill (solid or hollow outline), a thin coloured frame around
the image, a word placed in any free cell (`word_at`), and scenes of 2-3 objects, so that relations and relative
sizes have something to talk about. A scene knows its world; rendering, parsing and describing follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Saturated colours, pairwise ≥ ~100 apart in RGB and far from the neutral backgrounds, so that a pixel mixed with
# the background (JPEG, resizing) still lies closest to the segment background→its own colour. Their luma
# (0.299 R + 0.587 G + 0.114 B) is also ≥ 30 away from every background's: curation's blur and entropy filters
# look at grayscale, where a green (luma 121) on the gray background (128) would vanish and read as blurry.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),  # luma 89
    "orange": (250, 140, 30),  # 160
    "yellow": (235, 225, 40),  # 207
    "green": (30, 140, 50),  # 97
    "cyan": (60, 215, 230),  # 170
    "blue": (40, 75, 220),  # 81
    "purple": (140, 55, 190),  # 96
    "pink": (245, 115, 185),  # 162
}

# Side of a shape's bounding square as a fraction of its cell's side. At 32² a cell is 10.7 px: large ≈ 8 px,
# small ≈ 4.7 px.
SIZES: dict[str, float] = {"small": 0.44, "large": 0.76}

# 3×3 grid in reading order: name -> (row, col).
CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top center": (0, 1),
    "top right": (0, 2),
    "middle left": (1, 0),
    "center": (1, 1),
    "middle right": (1, 2),
    "bottom left": (2, 0),
    "bottom center": (2, 1),
    "bottom right": (2, 2),
}

# Neutral backgrounds: no object colour is near the grey axis, which keeps segmentation a distance test.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}

# Short uppercase words a scene may carry (drawn in neutral ink in an empty cell, see `word_cell`).
WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "LENS", "HELLO", "STOP", "OK", "ZEN", "FOX", "MOON", "JAZZ", "HI")

# The word goes into the first empty cell in this order: bottom row first, so it reads like a caption.
WORD_CELL_ORDER: tuple[str, ...] = (
    "bottom center", "bottom left", "bottom right", "top center", "top left", "top right",
    "middle left", "middle right", "center",
)


WORLDS: tuple[str, ...] = ("basic", "rich")

# Rich world only. Hollow = the shape minus a copy of itself scaled by HOLLOW_INNER about its centre, so the outline
# is uniform; only large shapes may be hollow: a small one at 32² is 4.7 px, its hole under one pixel.
FILLS: tuple[str, ...] = ("solid", "hollow")
HOLLOW_INNER = 0.55
# Frame colours (names of COLORS): far from all three backgrounds and from each other. The frame is FRAME_WIDTH of
# the image side (1 px at 32², 2 at 64²); a large shape keeps (1 - 0.76) / 2 / 3 = 0.04 of the side free at the
# image edge, so the frame never touches an object.
FRAMES: tuple[str, ...] = ("red", "green", "blue", "yellow")
FRAME_WIDTH = 1 / 32
RICH_OBJECTS = (2, 3)  # object counts whose dense caption runs 80-120 words (4 objects run past 120)
RICH_WORD_PROB = 0.6  # a word is one of the rich caption's details, so it is drawn more often than in basic
RICH_FRAME_PROB = 0.5


class Rng(Protocol):
    """Anything with `.random() -> float in [0, 1)`: `random.Random` or `numpy.random.Generator`."""

    def random(self) -> float: ...


def pick(rng: Rng, items: tuple | list) -> Any:
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: str
    fill: str = "solid"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.color, COLORS, "color"),
            (self.size, SIZES, "size"),
            (self.cell, CELLS, "cell"),
            (self.fill, FILLS, "fill"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(allowed)}")
        if self.fill == "hollow" and self.size != "large":
            raise ValueError(f"only large objects can be hollow, got a hollow {self.size} {self.shape}")

    def to_dict(self) -> dict[str, str]:
        """The four basic keys; "fill" only when hollow (so basic objects serialize exactly as before)."""
        data = {"shape": self.shape, "color": self.color, "size": self.size, "cell": self.cell}
        return data if self.fill == "solid" else {**data, "fill": self.fill}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    background: str = "white"
    word: str | None = None
    frame: str | None = None  # rich: the colour of a thin border around the image (one of FRAMES)
    word_at: str | None = None  # rich: the word's cell when it is not the default one (see `word_cell`)
    world: str = "basic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: list(CELLS).index(o.cell))))
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; known: {', '.join(WORLDS)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        rich = [what for what, used in (("a frame", self.frame is not None), ("word_at", self.word_at is not None),
                                        ("hollow objects", any(o.fill != "solid" for o in self.objects))) if used]
        if rich and self.world != "rich":
            raise ValueError(f"{' and '.join(rich)} need world='rich'")
        if self.frame is not None and self.frame not in FRAMES:
            raise ValueError(f"unknown frame {self.frame!r}; known: {', '.join(FRAMES)}")
        if self.word_at is not None:
            if not self.word or self.word_at not in CELLS or self.word_at in cells:
                raise ValueError(f"word_at {self.word_at!r} needs a word and an empty cell")
            if self.word_at == self._default_word_cell():  # one spelling per scene: equal scenes compare equal
                object.__setattr__(self, "word_at", None)

    def _default_word_cell(self) -> str | None:
        used = {o.cell for o in self.objects}
        return next((c for c in WORD_CELL_ORDER if c not in used), None)

    @property
    def word_cell(self) -> str | None:
        """Where the word is drawn: `word_at`, else the first empty cell of WORD_CELL_ORDER (None without word or
        room)."""
        if not self.word:
            return None
        return self.word_at or self._default_word_cell()

    def to_dict(self) -> dict[str, Any]:
        """The basic keys (objects, background, word) and the rich ones only when they are not their defaults, so a
        basic scene serializes exactly as before and old JSON still loads."""
        data = {"objects": [o.to_dict() for o in self.objects], "background": self.background, "word": self.word}
        extra = {"frame": self.frame, "word_at": self.word_at, "world": None if self.world == "basic" else self.world}
        return {**data, **{k: v for k, v in extra.items() if v is not None}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(Obj(**{k: o[k] for k in ("shape", "color", "size", "cell")}, fill=o.get("fill", "solid"))
                        for o in data["objects"])
        return cls(objects=objects, background=data.get("background", "white"), word=data.get("word"),
                   frame=data.get("frame"), word_at=data.get("word_at"), world=data.get("world", "basic"))


def random_scene(rng: Rng, min_objects: int = 1, max_objects: int = 4, word_prob: float | None = None,
                 world: str = "basic") -> Scene:
    """A scene with one object per cell; objects are drawn independently, cells without replacement.

    word_prob: None is the world's default (basic 0.2, rich RICH_WORD_PROB). world="rich" also draws fills, a frame
    (RICH_FRAME_PROB) and clamps the object count to RICH_OBJECTS."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    if not 1 <= min_objects <= max_objects <= len(CELLS) - 1:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(CELLS) - 1}, got {min_objects}, {max_objects}")
    if world == "rich":
        return _random_rich(rng, min_objects, max_objects, RICH_WORD_PROB if word_prob is None else word_prob)
    word_prob = 0.2 if word_prob is None else word_prob
    # Basic: these draws, in this order, are the world's definition; changing them changes every seed's scene.
    count = min_objects + min(int(rng.random() * (max_objects - min_objects + 1)), max_objects - min_objects)
    keys = [rng.random() for _ in CELLS]  # a shuffle that works with any rng offering .random()
    cells = [c for _, c in sorted(zip(keys, CELLS))][:count]
    objects = tuple(
        Obj(shape=pick(rng, SHAPES), color=pick(rng, tuple(COLORS)), size=pick(rng, tuple(SIZES)), cell=cell)
        for cell in cells
    )
    background = pick(rng, tuple(BACKGROUNDS))
    word = pick(rng, WORDS) if rng.random() < word_prob else None
    return Scene(objects=objects, background=background, word=word)


def _random_rich(rng: Rng, min_objects: int, max_objects: int, word_prob: float) -> Scene:
    low, high = max(min_objects, RICH_OBJECTS[0]), min(max_objects, RICH_OBJECTS[1])
    if low > high:
        raise ValueError(f"the rich world has {RICH_OBJECTS[0]}-{RICH_OBJECTS[1]} objects; "
                         f"min_objects={min_objects}, max_objects={max_objects} leave none")
    count = low + min(int(rng.random() * (high - low + 1)), high - low)
    keys = [rng.random() for _ in CELLS]
    cells = [c for _, c in sorted(zip(keys, CELLS))][:count]
    objects = []
    for cell in cells:
        shape, color, size = pick(rng, SHAPES), pick(rng, tuple(COLORS)), pick(rng, tuple(SIZES))
        fill = pick(rng, FILLS) if size == "large" else "solid"
        objects.append(Obj(shape, color, size, cell, fill))
    background = pick(rng, tuple(BACKGROUNDS))
    frame = pick(rng, FRAMES) if rng.random() < RICH_FRAME_PROB else None
    word = pick(rng, WORDS) if rng.random() < word_prob else None
    # The word goes into any free cell (not only the default one), so its place is worth describing.
    free = [c for c in CELLS if c not in cells]
    word_at = pick(rng, free) if word else None
    return Scene(tuple(objects), background, word, frame, word_at, "rich")
