"""Caption variant names, the one owner of their syntax: a captioner preset (`dense`, `short`, ...), `alt` (the
manifest's alt text), `<variant>@<words>`, that variant cut to its first N words (the caption-density sweep), or,
in a training mix only, `<variant>@random`: that variant cut to a uniformly drawn number of words each time a
sample is drawn (Brack et al. 2025's randomized caption lengths; training/caption_cut.py).

    lensforge precompute --data DATA --variants dense,dense@5,dense@15      # then train.data.captions: {dense@15: 1}
    split_variant("dense@15") == ("dense", 15)
    truncate_words("A large red circle in the top left.", 4) == "A large red circle"
    train.data.captions: {dense@random: 1}      # reads the stored `dense` captions; no precompute copy

A truncated variant is made from the stored caption of its base variant when precompute reads the captions
(training/precompute_plan.py), so it needs no captioner call, and its text is stored in the shards like any other.
A random-length variant is stored nowhere: the trainer cuts the base's caption text (meta.json) per draw and
encodes the cut with the shard set's own text encoder.
"""

from __future__ import annotations

import re

TRUNCATE = "@"
RANDOM = "random"  # `dense@random`: a training mix's per-draw random-length cut of `dense`
_NAME = re.compile(r"(?P<base>[^@\s,]+)(?:@(?P<words>[1-9]\d*))?")


def split_variant(name: str) -> tuple[str, int | None]:
    """`dense@15` → ("dense", 15); `dense` → ("dense", None). ValueError for anything else (`dense@0`, `@5`,
    `dense@015`: one spelling per content, so two names never hold the same captions)."""
    match = _NAME.fullmatch(name)
    if random_base(name) is not None:
        raise ValueError(f"caption variant {name!r} is cut per draw by the trainer and stored nowhere: precompute "
                         f"{random_base(name)!r} and name {name!r} in train.data.captions")
    if not match:
        raise ValueError(f"caption variant {name!r} is not NAME or NAME@WORDS (WORDS a positive integer, e.g. "
                         "dense@15)")
    words = match["words"]
    return match["base"], int(words) if words else None


def truncated(base: str, words: int) -> str:
    """The variant name of `base` cut to `words` words."""
    return f"{base}{TRUNCATE}{words}"


def truncate_words(text: str, words: int) -> str:
    """The first `words` whitespace-separated words of `text`, joined by single spaces; a text that already fits
    is returned unchanged (so `dense@1000` is byte-identical to `dense` for captions under 1000 words)."""
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words])


def variant_text(text: str | None, name: str) -> str | None:
    """The caption of variant `name` given its base variant's `text` (None, a missing caption, stays None)."""
    _, words = split_variant(name)
    return text if words is None or not isinstance(text, str) else truncate_words(text, words)


def random_base(name: str) -> str | None:
    """`dense@random` → "dense" (a random-length variant, its base checked); None for any other name."""
    base, sep, tail = name.rpartition(TRUNCATE)
    if not sep or tail != RANDOM:
        return None
    if split_variant(base)[1] is not None:
        raise ValueError(f"caption variant {name!r}: a random cut is of a whole caption, not of {base!r}")
    return base


def stored_variant(name: str) -> str:
    """The stored variant a training mix entry reads: `dense@random` → "dense", `dense@15` → itself (validated)."""
    base = random_base(name)
    if base is None:
        split_variant(name)
        return name
    return base
