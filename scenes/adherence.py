"""GenEval-like prompt adherence on the synthetic scenes: a fixed set of prompts per category, each sample parsed
back with `scenes.parse` and checked against the category's rule.

    from scenes.adherence import evaluate, prompt_set
    items = prompt_set(per_category=32, style="dense")
    result = evaluate(lambda prompts, seeds: my_model(prompts, seeds), items)
    print(result.to_markdown())

    lensforge evaluate --run runs/tiny --out eval/tiny        # the same from a checkpoint

Categories and their pass rules (`parsed` is what `scenes.parse` reads in the sample):

    single_object      one object; passes if parsed has an object of the prompt's shape.
    two_objects        two objects of different shapes; passes if both shapes are in parsed.
    counting           N = 1..4 objects; passes if parsed has exactly N objects.
    colors             one object; passes if parsed has an object of the prompt's colour.
    position           one object; passes if parsed has an object in the prompt's cell.
    color_attribution  two objects of different shapes and different colours; passes if each prompt shape is
                       in parsed with its own colour (a swap of the colours fails).

The rich world (`prompt_set(world="rich")`, `categories_for("rich")`) asks the same six (targets are rich scenes:
large objects solid or hollow, a frame half the time) and five more (an object is named by colour and shape):

    texture            one object; shape and fill cycle; passes if parsed has an object of that shape and fill.
    relative_size      two objects of different shapes and colours, one large and one small; passes if parsed has
                       the large one large and the small one small.
    relations          two objects of different shapes and colours, in one row, one column or diagonal (cycling);
                       passes if parsed has both, the first above / below / level with and left / right of / in line
                       with the second exactly as in the target ("directly left of" means the same row).
    text               one object and a word (word and cell cycle); passes if parsed reads ink in the word's cell and
                       the same word (parse reads words reliably at 32², see scenes/parse.py).
    frame              one object and a frame (colour cycles); passes if parsed has a frame of that colour.

Each rule checks only what its name says (colors ignores shape, position ignores colour and shape ...); the
categories are read together, as in GenEval: a model that paints every cell passes position but fails counting.
The attribute a category tests cycles over its values (shapes, shape pairs, colours, cells, counts), so every
value is asked equally often and a score is a balanced recall: a shapeless blob parses as a circle and would
otherwise flatter a model that always draws one. All objects are large (at 32² a small one is ~4.7 px and size is
not tested), backgrounds vary, and no scene carries a word. Everything else is drawn from a fixed seed.

Held out: the set is fixed (`PROMPT_SEED` and a per-category string seed); training data is drawn from other,
integer seeds, so an eval scene occurs in training only by chance. The combinations are few (a large single
object is one of 4 × 8 × 9 × 3 = 864 scenes), so these prompts test adherence, not novel combinations.
Prompts are `describe(scene, style)`: ask a model in the caption style it was trained on. The `short` style names
only one object, so under it two_objects, counting and color_attribution measure what the model does unprompted.

Chance: every image is also scored against every other prompt of its category; the mean is the expected score of
the same images under a random derangement of the prompts (CPU-RECIPES.md's shuffled-prompt chance), exactly and
without sampling. Scores, chance levels and their bootstrap intervals: `scenes.adherence_report`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
from PIL import Image

from scenes.adherence_report import RESAMPLES, ItemScore, Result, summarize
from scenes.describe import STYLES, describe
from scenes.parse import parse
from scenes.scene import (
    BACKGROUNDS, CELLS, COLORS, FILLS, FRAMES, RICH_FRAME_PROB, SHAPES, WORDS, WORLDS, Obj, Scene,
)

CATEGORIES: tuple[str, ...] = (  # the basic world's
    "single_object", "two_objects", "counting", "colors", "position", "color_attribution",
)
RICH_CATEGORIES: tuple[str, ...] = ("texture", "relative_size", "relations", "text", "frame")
ALL_CATEGORIES = CATEGORIES + RICH_CATEGORIES  # report order
RELATION_KINDS = ("row", "column", "diagonal")  # relations cycles over these
PROMPT_SEED = 0
MAX_COUNT = 4  # counting asks for 1..MAX_COUNT objects
SHAPE_PAIRS: tuple[tuple[str, str], ...] = tuple(combinations(SHAPES, 2))  # the 6 unordered pairs

ImageLike = Image.Image | np.ndarray
Generate = Callable[[list[str], list[int]], Sequence[ImageLike]]  # (prompts, seeds) -> one image per prompt


@dataclass(frozen=True)
class Item:
    category: str
    scene: Scene  # the target: what the prompt describes
    prompt: str


def _scene(rng: random.Random, shapes: Sequence[str], colors: Sequence[str], cells: Sequence[str] | None = None
           ) -> Scene:
    """Large objects of these shapes and colours in distinct cells (random unless given), on a random background."""
    cells = rng.sample(list(CELLS), len(shapes)) if cells is None else cells
    objects = tuple(Obj(s, c, "large", cell) for s, c, cell in zip(shapes, colors, cells, strict=True))
    return Scene(objects=objects, background=rng.choice(list(BACKGROUNDS)))


def _ordered_pair(rng: random.Random, k: int) -> list[str]:
    pair = list(SHAPE_PAIRS[k % len(SHAPE_PAIRS)])
    rng.shuffle(pair)  # which shape comes first in reading order is not part of the test
    return pair


def categories_for(world: str = "basic") -> tuple[str, ...]:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    return CATEGORIES if world == "basic" else ALL_CATEGORIES


def _dress(rng: random.Random, scene: Scene, fills: bool = True, frame: bool = True) -> Scene:
    """The scene in the rich world: random fills on its large objects and, half the time, a frame."""
    objects = tuple(replace(o, fill=rng.choice(FILLS)) if fills and o.size == "large" else o for o in scene.objects)
    framed = rng.choice(FRAMES) if frame and rng.random() < RICH_FRAME_PROB else scene.frame
    return replace(scene, objects=objects, frame=framed, world="rich")


def _related_cells(rng: random.Random, kind: str) -> list[str]:
    """Two cells in one row, one column or on a diagonal (differing in both), in random order."""
    pairs = [(a, b) for a in CELLS for b in CELLS if a != b and {
        "row": CELLS[a][0] == CELLS[b][0], "column": CELLS[a][1] == CELLS[b][1],
        "diagonal": CELLS[a][0] != CELLS[b][0] and CELLS[a][1] != CELLS[b][1]}[kind]]
    return list(rng.choice(pairs))


def _build_rich(category: str, rng: random.Random, k: int) -> Scene:
    """The k-th target of a rich-only category."""
    colors, cells = list(COLORS), list(CELLS)
    if category == "texture":
        scene = _scene(rng, [SHAPES[k // len(FILLS) % len(SHAPES)]], [rng.choice(colors)])
        scene = replace(scene, objects=(replace(scene.objects[0], fill=FILLS[k % len(FILLS)]),), world="rich")
        return _dress(rng, scene, fills=False)
    if category == "relative_size":
        scene = _scene(rng, _ordered_pair(rng, k), rng.sample(colors, 2))
        small = scene.objects[k % 2]  # which one is small alternates
        scene = replace(scene, objects=tuple(replace(o, size="small") if o == small else o for o in scene.objects))
        return _dress(rng, scene)
    if category == "relations":
        kind = RELATION_KINDS[k % len(RELATION_KINDS)]
        return _dress(rng, _scene(rng, _ordered_pair(rng, k), rng.sample(colors, 2), _related_cells(rng, kind)))
    if category == "text":
        word_at = cells[k % len(cells)]
        cell = rng.choice([c for c in cells if c != word_at])
        scene = _scene(rng, [rng.choice(SHAPES)], [rng.choice(colors)], [cell])
        return _dress(rng, replace(scene, word=WORDS[k % len(WORDS)], word_at=word_at, world="rich"))
    if category == "frame":
        scene = _scene(rng, [rng.choice(SHAPES)], [rng.choice(colors)])
        return replace(_dress(rng, scene, frame=False), frame=FRAMES[k % len(FRAMES)])
    raise ValueError(f"unknown category {category!r}; known: {', '.join(ALL_CATEGORIES)}")


def _build_basic(category: str, rng: random.Random, k: int) -> Scene:
    colors, cells = list(COLORS), list(CELLS)
    if category == "single_object":
        return _scene(rng, [SHAPES[k % len(SHAPES)]], [rng.choice(colors)])
    if category == "two_objects":
        return _scene(rng, _ordered_pair(rng, k), [rng.choice(colors), rng.choice(colors)])
    if category == "counting":
        n = 1 + k % MAX_COUNT
        return _scene(rng, [rng.choice(SHAPES) for _ in range(n)], [rng.choice(colors) for _ in range(n)])
    if category == "colors":
        return _scene(rng, [rng.choice(SHAPES)], [colors[k % len(colors)]])
    if category == "position":
        return _scene(rng, [rng.choice(SHAPES)], [rng.choice(colors)], [cells[k % len(cells)]])
    if category == "color_attribution":
        return _scene(rng, _ordered_pair(rng, k), rng.sample(colors, 2))
    raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def _build(category: str, rng: random.Random, k: int, world: str = "basic") -> Scene:
    """The k-th target scene of a category; the tested attribute cycles with k, the rest is drawn from rng."""
    if category in RICH_CATEGORIES:
        return _build_rich(category, rng, k)
    scene = _build_basic(category, rng, k)
    return scene if world == "basic" else _dress(rng, scene)


def prompt_set(per_category: int = 32, seed: int = PROMPT_SEED, style: str = "dense",
               categories: Sequence[str] | None = None, world: str = "basic") -> list[Item]:
    """`per_category` items of every category (default: all of the world's), category by category. Deterministic,
    and a longer set extends a shorter one: item k of a category depends only on (seed, world, category, k)."""
    known = categories_for(world)
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; known: {', '.join(STYLES)}")
    items = []
    for category in known if categories is None else categories:
        if category not in known:
            raise ValueError(f"unknown category {category!r} in the {world} world; known: {', '.join(known)}")
        # A string seed: apart from training's integer seeds (the basic one is the original, unchanged).
        rng = random.Random(f"adherence/{seed}/{category}" if world == "basic" else f"adherence/{seed}/rich/{category}")
        for k in range(per_category):
            scene = _build(category, rng, k, world)
            items.append(Item(category, scene, describe(scene, style)))
    return items


def passes(category: str, target: Scene, parsed: Scene) -> bool:
    """The category's rule (see the module docstring): does `parsed` show what `target`'s prompt asks?"""
    got = parsed.objects
    if category == "single_object":
        return any(o.shape == target.objects[0].shape for o in got)
    if category == "two_objects":
        return {o.shape for o in target.objects} <= {o.shape for o in got}
    if category == "counting":
        return len(got) == len(target.objects)
    if category == "colors":
        return any(o.color == target.objects[0].color for o in got)
    if category == "position":
        return any(o.cell == target.objects[0].cell for o in got)
    if category == "color_attribution":
        return all(any(o.shape == t.shape and o.color == t.color for o in got) for t in target.objects)
    return _passes_rich(category, target, parsed)


def _signs(a: Obj, b: Obj) -> tuple[int, int]:
    """(row, column) order of a against b: -1 above / left of, 0 level / in line, 1 below / right of."""
    (ra, ca), (rb, cb) = CELLS[a.cell], CELLS[b.cell]
    return (ra > rb) - (ra < rb), (ca > cb) - (ca < cb)


def _passes_rich(category: str, target: Scene, parsed: Scene) -> bool:
    got = parsed.objects

    def like(t: Obj) -> list[Obj]:  # parsed objects that could be the target object t (same colour and shape)
        return [o for o in got if (o.shape, o.color) == (t.shape, t.color)]

    if category == "texture":
        t = target.objects[0]
        return any(o.shape == t.shape and o.fill == t.fill for o in got)
    if category == "relative_size":
        return all(any(o.size == t.size for o in like(t)) for t in target.objects)
    if category == "relations":
        a, b = target.objects
        return any(_signs(x, y) == _signs(a, b) for x in like(a) for y in like(b) if x != y)
    if category == "text":
        return parsed.word_cell == target.word_cell and parsed.word == target.word
    if category == "frame":
        return parsed.frame == target.frame
    raise ValueError(f"unknown category {category!r}; known: {', '.join(ALL_CATEGORIES)}")


def score(items: Sequence[Item], images: Sequence[ImageLike], resamples: int = RESAMPLES) -> Result:
    """Parse every image (PIL or uint8 array, any size) in its item's world, apply its item's rule, and summarize
    per category (in ALL_CATEGORIES order) with bootstrap intervals and the shuffled-prompt chance level."""
    if len(items) != len(images):
        raise ValueError(f"{len(items)} items but {len(images)} images")
    if not items:
        raise ValueError("nothing to score: no items")
    parsed = [parse(image, world=it.scene.world) for it, image in zip(items, images)]  # the target's world
    passed = [passes(it.category, it.scene, p) for it, p in zip(items, parsed)]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        if item.category not in ALL_CATEGORIES:
            raise ValueError(f"unknown category {item.category!r}; known: {', '.join(ALL_CATEGORIES)}")
        groups.setdefault(item.category, []).append(i)
    hits, chance = {}, {}
    for category in (c for c in ALL_CATEGORIES if c in groups):
        index = groups[category]
        hits[category] = np.array([passed[i] for i in index], dtype=np.float64)
        # Image i against every other prompt j of the category: the expected score under a random derangement.
        chance[category] = np.array([
            np.mean([passes(category, items[j].scene, parsed[i]) for j in index if j != i]) for i in index
        ]) if len(index) > 1 else None
    scored = tuple(ItemScore(it.category, it.prompt, ok, it.scene, p) for it, p, ok in zip(items, parsed, passed))
    return summarize(hits, chance, scored, resamples)


def _at_size(image: ImageLike, size: int | None) -> ImageLike:
    """The image area-resized to size × size (unchanged if it already is, or if size is None)."""
    if size is None:
        return image
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return pil if pil.size == (size, size) else pil.convert("RGB").resize((size, size), Image.BOX)


def evaluate(generate: Generate, items: Sequence[Item], size: int | None = 32, seed: int = 0,
             resamples: int = RESAMPLES) -> Result:
    """Sample one image per item with `generate(prompts, seeds)` (seed + k for item k), bring each to size × size
    (so every model is scored at one resolution; None: as generated), and score them."""
    prompts, seeds = [it.prompt for it in items], [seed + k for k in range(len(items))]
    images = list(generate(prompts, seeds))
    if len(images) != len(items):
        raise ValueError(f"generate returned {len(images)} images for {len(items)} prompts")
    return score(items, [_at_size(image, size) for image in images], resamples)
