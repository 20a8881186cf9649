"""Yes / no rubric questions about a scene, and their answers from an image: the synthetic world's stand-in for a
vision judge (issue 17's `judge` reward, served offline by the local endpoint).

    scene = read_description(prompt)            # the scene a dense or medium description names (describe's inverse)
    questions = rubric_for(scene)                # one question per object, colour, place, the count, the background
    yes = answer(questions[0], parse(image))     # True / False; None for a question it does not know

Each object gives "Is there a <colour> <shape>?" and "Is the <colour> <shape> <in the cell>?"; the scene gives
"Are there exactly N objects?" (or "Is there exactly 1 object?") and "Is the background <colour>?"; every rubric ends with STRUCTURE, Lens-RL's
global "structural integrity" item, answered here as "the image parses into at least one object" (the parser
has no finer notion of a broken shape: a smeared sample either parses as shapes or as an empty scene).
"""

from __future__ import annotations

import re

from scenes.describe import article, position
from scenes.scene import BACKGROUNDS, CELLS, COLORS, FILLS, SHAPES, SIZES, Obj, Scene

STRUCTURE = "Is every object drawn as one whole, clean shape?"

_ALT = {name: "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
        for name, values in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("cell", CELLS),
                             ("bg", BACKGROUNDS), ("fill", FILLS))}
# A rich description puts the fill between size and colour ("a large hollow red circle"): read it, then ignore it.
_OBJECT = re.compile(rf"\b(?P<size>{_ALT['size']})\s+(?:(?:{_ALT['fill']})\s+)?(?P<color>{_ALT['color']})\s+"
                     rf"(?P<shape>{_ALT['shape']})"
                     rf"\s+in\s+the\s+(?P<cell>{_ALT['cell']})\b", re.IGNORECASE)
_BACKGROUND = re.compile(rf"\bon\s+a\s+plain\s+(?P<bg>{_ALT['bg']})\s+background\b", re.IGNORECASE)

_THERE_IS = re.compile(rf"^Is there an? (?P<color>{_ALT['color']}) (?P<shape>{_ALT['shape']})\?$")
_PLACED = re.compile(rf"^Is the (?P<color>{_ALT['color']}) (?P<shape>{_ALT['shape']}) "
                     rf"in the (?P<cell>{_ALT['cell']})\?$")
_COUNT = re.compile(r"^(?:Is|Are) there exactly (?P<n>\d+) objects?\?$")
_BG = re.compile(rf"^Is the background (?P<bg>{_ALT['bg']})\?$")


def read_description(text: str) -> Scene | None:
    """The scene a description names ("A large red circle in the top left." sentences or phrases, "on a plain
    white background"); None when it names no object. Sizes, colours and cells are read, counts and words are not;
    a rich description reads as its basic scene (fills, frame, word and relations are ignored)."""
    objects = {}
    for m in _OBJECT.finditer(text):
        cell = m["cell"].lower()
        objects.setdefault(cell, Obj(m["shape"].lower(), m["color"].lower(), m["size"].lower(), cell))
    if not objects:
        return None
    bg = _BACKGROUND.search(text)
    return Scene(objects=tuple(objects.values()), background=bg["bg"].lower() if bg else "white")


def rubric_for(scene: Scene) -> list[str]:
    """About ten yes / no questions a faithful image of `scene` answers "yes" to, STRUCTURE last."""
    questions = []
    for o in scene.objects:
        questions.append(f"Is there {article(f'{o.color} {o.shape}')}?")
        questions.append(f"Is the {o.color} {o.shape} {position(o.cell)}?")
    n = len(scene.objects)
    questions.append("Is there exactly 1 object?" if n == 1 else f"Are there exactly {n} objects?")
    questions.append(f"Is the background {scene.background}?")
    return [*dict.fromkeys(questions), STRUCTURE]


def answer(question: str, parsed: Scene) -> bool | None:
    """What `parsed` (the scene an image shows) answers to one rubric question; None when it is none of
    rubric_for's questions."""
    q = question.strip()
    got = parsed.objects
    if q == STRUCTURE:
        return bool(got)
    if m := _THERE_IS.match(q):
        return any(o.color == m["color"] and o.shape == m["shape"] for o in got)
    if m := _PLACED.match(q):
        return any(o.color == m["color"] and o.shape == m["shape"] and o.cell == m["cell"] for o in got)
    if (m := _COUNT.match(q)) is not None:
        return len(got) == int(m["n"])
    if m := _BG.match(q):
        return parsed.background == m["bg"]
    return None
