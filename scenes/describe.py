"""Captions of a `Scene` at a chosen density, plus the weak alt text a web page would carry.

    describe(scene, "dense")               # a paragraph: every object, counts, background, the word verbatim
    describe(scene, "medium")              # one sentence listing every object
    describe(scene, "short")               # one sentence, the most salient object only
    describe(scene, "tags")                # "red circle, blue star, white background"
    describe(scene, "dense", max_words=20) # whole sentences/phrases while they fit the budget
    alt(scene, random.Random(0))           # "red circle" / "a photo of a star" / "" (sometimes wrong)

Deterministic: the same scene (and rng state) gives the same text. Objects are listed in reading order.
"""

from __future__ import annotations

from collections import Counter

from scenes.scene import COLORS, SHAPES, Obj, Rng, Scene, pick

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


def phrase(obj: Obj, with_size: bool = True) -> str:
    """'a large red circle'."""
    words = [obj.size] if with_size else []
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


def _medium(scene: Scene) -> str:
    parts = [f"{phrase(o)} {position(o.cell)}" for o in scene.objects]
    tail = f' and the word "{scene.word}"' if scene.word else ""
    body = ", ".join(parts) if parts else "nothing"
    return f"{body[0].upper()}{body[1:]}{tail}, on a {scene.background} background."


def _short(scene: Scene) -> str:
    obj = salient(scene)
    head = phrase(obj, with_size=False) if obj else "an empty scene"
    return f"{head[0].upper()}{head[1:]} on a {scene.background} background."


def _tags(scene: Scene) -> list[str]:
    tags = [f"{o.color} {o.shape}" for o in scene.objects] + [f"{scene.background} background"]
    if scene.word:
        tags.append(f'text "{scene.word}"')
    return tags


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
        return _fit(_sentences_dense(scene), max_words, " ")
    if style == "tags":
        return _fit(list(enumerate(_tags(scene))), max_words, ", ")
    if style == "short":
        return _fit([(0, _short(scene))], max_words, " ")
    text = _medium(scene)
    if max_words is None or len(text.split()) <= max_words:
        return text
    cut = _fit([(k, f"{phrase(o)} {position(o.cell)}") for k, o in enumerate(scene.objects)], max_words, ", ")
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
