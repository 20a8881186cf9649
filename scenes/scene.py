"""The scene world's vocabulary and its two record types, `Obj` and `Scene`.

This module is the one owner of the vocabulary (shapes, colours, sizes, cells, backgrounds, words): the renderer,
the parser, the describer and the prompt-adherence evaluator all import it from here.

    from scenes.scene import random_scene
    scene = random_scene(random.Random(0), min_objects=1, max_objects=4, word_prob=0.2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.color, COLORS, "color"),
            (self.size, SIZES, "size"),
            (self.cell, CELLS, "cell"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    background: str = "white"
    word: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: list(CELLS).index(o.cell))))
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {', '.join(BACKGROUNDS)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")

    @property
    def word_cell(self) -> str | None:
        """Where the word is drawn: the first empty cell of WORD_CELL_ORDER (None without word or room)."""
        if not self.word:
            return None
        used = {o.cell for o in self.objects}
        return next((c for c in WORD_CELL_ORDER if c not in used), None)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background, "word": self.word}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(Obj(**{k: o[k] for k in ("shape", "color", "size", "cell")}) for o in data["objects"])
        return cls(objects=objects, background=data.get("background", "white"), word=data.get("word"))


def random_scene(rng: Rng, min_objects: int = 1, max_objects: int = 4, word_prob: float = 0.2) -> Scene:
    """A scene with one object per cell; objects are drawn independently, cells without replacement."""
    if not 1 <= min_objects <= max_objects <= len(CELLS) - 1:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(CELLS) - 1}, got {min_objects}, {max_objects}")
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
