"""Token counts for a caption request: the one owner of the rules that the local endpoint bills by and that the
client's dry-run cost estimate imports.

    from captioning.tokens import image_tokens, text_tokens, completion_tokens
    image_tokens(1024, 1024, "high")   # 765: scaled to 768², 4 tiles of 512 → 85 + 170 × 4
    text_tokens("Describe the image.") # 5: ceil(chars / 4)

Images follow OpenAI's published vision pricing for the gpt-4.1 family (gpt-4.1, -mini, -nano), "detail":
    low        → 85 tokens, whatever the size;
    high, auto → scale to fit inside 2048 × 2048, then so the shortest side is 768 (both only ever shrink), count
                 512-px tiles: 85 + 170 × tiles.
Text is approximated as 4 characters a token and a caption as 1.33 tokens a word (English BPE averages); the local
endpoint reports exactly these numbers in `usage`, so estimates and the cost ledger agree offline.
"""

from __future__ import annotations

import math

DETAILS = ("low", "high", "auto")
LOW_DETAIL_TOKENS = 85  # the base cost, also the whole cost at detail "low"
TILE_TOKENS = 170  # per 512-px tile at detail high/auto
TILE_SIDE = 512
FIT_SIDE = 2048  # first fit inside 2048 × 2048 ...
SHORT_SIDE = 768  # ... then shrink so the shortest side is 768
CHARS_PER_TOKEN = 4
TOKENS_PER_WORD = 1.33


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """Prompt tokens of one image of `width` × `height` pixels sent at `detail` (low / high / auto)."""
    if detail not in DETAILS:
        raise ValueError(f"unknown image detail {detail!r}; known: {', '.join(DETAILS)}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if detail == "low":
        return LOW_DETAIL_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > FIT_SIDE:
        scale = FIT_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > SHORT_SIDE:
        scale = SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    # Round the scaled size to whole pixels before tiling: 768.0000001 must stay 2 tiles, not 3.
    tiles = math.ceil(round(w) / TILE_SIDE) * math.ceil(round(h) / TILE_SIDE)
    return LOW_DETAIL_TOKENS + TILE_TOKENS * tiles


def text_tokens(text: str) -> int:
    """Prompt tokens of a text: ceil(characters / 4)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def completion_tokens(text: str) -> int:
    """Completion tokens of a caption: ceil(words × 1.33)."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def words_within(max_tokens: int) -> int:
    """The most words whose completion tokens fit `max_tokens` (the inverse of `completion_tokens`)."""
    words = int(max_tokens / TOKENS_PER_WORD)
    while words > 0 and math.ceil(words * TOKENS_PER_WORD) > max_tokens:
        words -= 1
    while math.ceil((words + 1) * TOKENS_PER_WORD) <= max_tokens:
        words += 1
    return max(words, 0)
