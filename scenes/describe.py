"""Captions of a `Scene` at a chosen density, plus the weak alt text a web page would carry.

    describe(scene, "dense")               # a paragraph: every object, counts, background, the word verbatim
    describe(scene, "medium")              # one sentence listing every object
    describe(scene, "short")               # one sentence, the most salient object only
    describe(scene, "tags")                # "red circle, blue star, white background"
    describe(scene, "dense", max_words=20) # whole sentences/phrases while they fit the budget
    alt(scene, random.Random(0))           # "red circle" / "a photo of a star" / "" (sometimes wrong)

Deterministic: the same scene (and rng state) gives the same text. Objects are listed in reading order.

Rich scenes (`scene.world == "rich"`) get their own dense paragraph, 80-120 words for every scene `random_scene(...,
world="rich")` draws: every object with size, fill, colour, shape and cell; the relation of each object to the next
in reading order; relative sizes; counts of shapes and fills; the word verbatim and where, or that there is none;
the frame, or that there is none; the background. Medium, short and tags name the fill and the frame too.
"""

from __future__ import annotations

from collections import Counter

from scenes.render import ink_name
from scenes.scene import CELLS, COLORS, FILLS, SHAPES, Obj, Rng, Scene, pick

STYLES = ("dense", "medium", "short", "tags")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALT_EMPTY_PROB = 0.15  # web images often have no alt text at all
ALT_WRONG_PROB = 0.20  # ... or one that names the wrong colour or shape


def count_word(n: int, noun: str) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {noun}" if n == 1 else f"{word} {noun}s"


def position(cell: str) -> str:
    return "in the center" if cell == "center" else f"in the {cell}"


def article(text: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if text[:1] in "aeiou" else "a ") + text


def phrase(obj: Obj, with_size: bool = True, with_fill: bool = False) -> str:
    """'a large red circle'; with_fill: 'a large hollow red circle'."""
    words = ([obj.size] if with_size else []) + ([obj.fill] if with_fill else [])
    return article(" ".join(words + [obj.color, obj.shape]))


def salient(scene: Scene) -> Obj | None:
    """The first large object in reading order, else the first object."""
    return next((o for o in scene.objects if o.size == "large"), scene.objects[0] if scene.objects else None)


def _sentences_dense(scene: Scene) -> list[tuple[int, str]]:
    """The dense caption as (priority, sentence) pairs in reading order. Under a word budget, sentences are kept by
    priority (0 first): the objects, then the scene line, the word, the counts."""
    objs = scene.objects
    intro = f"{count_word(len(objs), 'object').capitalize()} on a plain {scene.background} background."
    sentences = [(1, intro)]
    sentences += [(0, f"{phrase(o).capitalize()} {position(o.cell)}.") for o in objs]
    counts = Counter(o.shape for o in objs)
    if len(objs) > 1:
        parts = [count_word(counts[shape], shape) for shape in SHAPES if counts[shape]]
        sentences.append((3, f"In all: {', '.join(parts)}."))
        colors = Counter(o.color for o in objs)
        repeated = [f"{count_word(n, 'object')} are {c}" for c, n in colors.items() if n > 1]
        if repeated:
            sentences.append((3, f"{' and '.join(repeated).capitalize()}."))
    if scene.word:
        sentences.append((2, f'The word "{scene.word}" is written {position(scene.word_cell or "center")}.'))
    return sentences


def _medium_parts(scene: Scene) -> list[str]:
    rich = scene.world == "rich"
    return [f"{phrase(o, with_fill=rich)} {position(o.cell)}" for o in scene.objects]


def _medium(scene: Scene) -> str:
    parts = _medium_parts(scene)
    tail = f' and the word "{scene.word}"' if scene.word else ""
    if scene.world == "rich" and scene.word:
        tail += f" {position(scene.word_cell or 'center')}"
    body = ", ".join(parts) if parts else "nothing"
    frame = f" with a thin {scene.frame} border" if scene.frame else ""
    return f"{body[0].upper()}{body[1:]}{tail}, on a {scene.background} background{frame}."


def _short(scene: Scene) -> str:
    obj = salient(scene)
    head = phrase(obj, with_size=False, with_fill=scene.world == "rich") if obj else "an empty scene"
    return f"{head[0].upper()}{head[1:]} on a {scene.background} background."


def _tags(scene: Scene) -> list[str]:
    rich = scene.world == "rich"
    tags = [f"{o.fill} {o.color} {o.shape}" if rich else f"{o.color} {o.shape}" for o in scene.objects]
    tags.append(f"{scene.background} background")
    if scene.frame:
        tags.append(f"{scene.frame} border")
    if scene.word:
        tags.append(f'text "{scene.word}"')
    return tags


# --- the rich world's dense paragraph -----------------------------------------------------------------------------

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")


def reference(obj: Obj, objects: tuple[Obj, ...]) -> str:
    """'the red circle', or 'the second red circle' (reading order) when others share its colour and shape."""
    same = [o for o in objects if (o.color, o.shape) == (obj.color, obj.shape)]
    ordinal = f"{ORDINALS[same.index(obj)]} " if len(same) > 1 else ""
    return f"the {ordinal}{obj.color} {obj.shape}"


def relation(a: Obj, b: Obj) -> str:
    """Where a is relative to b, from their cells: 'directly above', 'directly left of', 'below and right of' ..."""
    (ra, ca), (rb, cb) = CELLS[a.cell], CELLS[b.cell]
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "left of" if ca < cb else "right of" if ca > cb else ""
    return f"{vertical} and {horizontal}" if vertical and horizontal else f"directly {vertical or horizontal}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _sizes(objs: tuple[Obj, ...]) -> str:
    """Relative sizes: 'The red circle is larger than the blue star.', 'The blue star is the only small object.'"""
    by = {size: [o for o in objs if o.size == size] for size in ("large", "small")}
    if not by["large"] or not by["small"]:
        head = "The two" if len(objs) == 2 else f"All {NUMBER_WORDS[len(objs)]}"
        return f"{head} objects are exactly the same size."
    if len(objs) == 2:
        return f"{reference(by['large'][0], objs).capitalize()} is larger than {reference(by['small'][0], objs)}."
    alone = "large" if len(by["large"]) == 1 else "small"
    return f"{reference(by[alone][0], objs).capitalize()} is the only {alone} object."


def _counts(objs: tuple[Obj, ...]) -> str:
    shapes, fills = Counter(o.shape for o in objs), Counter(o.fill for o in objs)
    parts = [count_word(shapes[s], s) for s in SHAPES if shapes[s]]
    kinds = [count_word(fills[f], f"{f} object") for f in FILLS if fills[f]]
    return f"In all: {_join(parts)}; {_join(kinds)}."


def _sentences_rich(scene: Scene) -> list[tuple[int, str]]:
    """The rich dense paragraph as (priority, sentence): objects (0), the scene line (1), relations and the word
    (2), sizes and the frame (3), counts and the background (4). A missing word or frame gets a sentence of about
    the same length as a present one, so the length depends mostly on the object count (2 → ~90, 3 → ~110)."""
    objs, bg = scene.objects, scene.background
    sentences = [(1, f"{count_word(len(objs), 'object').capitalize()} on a plain {bg} background.")]
    sentences += [(0, f"{phrase(o, with_fill=True).capitalize()} {position(o.cell)}.") for o in objs]
    sentences += [(2, f"{reference(a, objs).capitalize()} is {relation(a, b)} {reference(b, objs)}.")
                  for a, b in zip(objs, objs[1:])]
    if len(objs) > 1:
        sentences += [(3, _sizes(objs)), (4, _counts(objs))]
    if scene.word:
        where = position(scene.word_cell or "center")
        sentences.append((2, f'The word "{scene.word}" is written in small {ink_name(bg)} capital letters {where}.'))
    else:
        sentences.append((2, "There is no writing anywhere in the image, no letters and no words."))
    if scene.frame:
        sentences.append((3, f"A thin {scene.frame} border runs around all four edges of the image."))
    else:
        sentences.append((3, "The image has no border; the background runs right up to its edges."))
    sentences.append((4, f"Apart from these, the {bg} background is flat and empty."))
    return sentences


def _fit(units: list[tuple[int, str]], max_words: int | None, sep: str) -> str:
    """Join whole units, kept by priority while they fit `max_words`, in their original order; if not even the first
    fits, cut it word by word."""
    if max_words is None:
        return sep.join(text for _, text in units)
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    kept: set[int] = set()
    for index in sorted(range(len(units)), key=lambda k: (units[k][0], k)):
        trial = sep.join(units[k][1] for k in sorted(kept | {index}))
        if len(trial.split()) > max_words:
            break
        kept.add(index)
    if not kept:
        first = min(range(len(units)), key=lambda k: (units[k][0], k))
        return " ".join(units[first][1].split()[:max_words])
    return sep.join(units[k][1] for k in sorted(kept))


def describe(scene: Scene, style: str = "dense", max_words: int | None = None) -> str:
    """The scene's caption in `style` (one of STYLES), at most `max_words` words when given."""
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; known: {', '.join(STYLES)}")
    if style == "dense":
        return _fit(_sentences_rich(scene) if scene.world == "rich" else _sentences_dense(scene), max_words, " ")
    if style == "tags":
        return _fit(list(enumerate(_tags(scene))), max_words, ", ")
    if style == "short":
        return _fit([(0, _short(scene))], max_words, " ")
    text = _medium(scene)
    if max_words is None or len(text.split()) <= max_words:
        return text
    cut = _fit(list(enumerate(_medium_parts(scene))), max_words, ", ")
    return cut[:1].upper() + cut[1:]


def alt(scene: Scene, rng: Rng) -> str:
    """A weak web alt text: empty (~15 %), else one object, with a wrong colour or shape ~20 % of the time."""
    if rng.random() < ALT_EMPTY_PROB or not scene.objects:
        return ""
    obj = salient(scene)
    color, shape = obj.color, obj.shape
    if rng.random() < ALT_WRONG_PROB:
        if rng.random() < 0.5:
            color = pick(rng, tuple(c for c in COLORS if c != color))
        else:
            shape = pick(rng, tuple(s for s in SHAPES if s != shape))
    template = pick(rng, ("{c} {s}", "{a_cs}", "image of {a_s}", "{s} icon", "a photo of {a_cs}", "{c} {s} clipart"))
    return template.format(c=color, s=shape, a_s=article(shape), a_cs=article(f"{color} {shape}"))
