"""Checks of one caption answer → (status, reason): ok, refused, or error with why.

    check_caption("I'm sorry, but I can't help with that.", "stop", preset)  # ("refused", "refusal: I'm sorry…")
    check_caption("A red circle", "length", preset)                          # ("error", "truncated: ...")

A failed check costs money like any answer, so the row keeps its cost; the key is asked again up to
`retry_failed_checks` times in the same run, and again on the next run (only `ok` is final).
"""

from __future__ import annotations

import re

from captioning.presets import Preset
from captioning.schema import STATUS_ERROR, STATUS_OK, STATUS_REFUSED

# Openings of refusals seen from GPT-4-class models; anchored at the start so a caption that *quotes* such words
# (a sign reading "I cannot") is not taken for one.
REFUSAL_PATTERNS = [
    r"^\W*I'?\s?a?m (very )?sorry",
    r"^\W*(I|We) (cannot|can't|can ?not|am unable|'m unable|won't|will not)",
    r"^\W*(Sorry|Unfortunately),? (but )?I",
    r"^\W*As an AI",
    r"^\W*I'm not able to",
    r"^\W*I apologi[sz]e",
]
REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)

# The most frequent English function words: a caption of ≥ 8 words with none of these is unlikely English.
EN_STOPWORDS = frozenset(
    "a an the of in on at to and with is are its it this there two three four by from near for as its one".split()
)
MIN_ASCII_LETTER_SHARE = 0.85  # of all letters; quoted foreign text in an English caption stays well above


def words(text: str) -> int:
    """Word count; for comma-separated tags each tag's words count too."""
    return len(text.split())


def looks_english(text: str, prose: bool = True) -> bool:
    """Mostly ASCII letters, and (for prose) some of the commonest English words."""
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) / len(letters) < MIN_ASCII_LETTER_SHARE:
        return False
    tokens = re.findall(r"[a-z']+", text.lower())
    return not prose or len(tokens) < 8 or any(t in EN_STOPWORDS for t in tokens)


def check_caption(text: str | None, finish_reason: str | None, preset: Preset, language: str | None = "en",
                  word_ranges: dict[str, tuple[int, int]] | None = None,
                  refusal: str | None = None) -> tuple[str, str | None]:
    """(status, reason); reason is None when ok. `refusal` is the API's structured refusal field, if any."""
    if refusal:
        return STATUS_REFUSED, f"refusal: {refusal[:120]}"
    text = (text or "").strip()
    if finish_reason == "content_filter":
        return STATUS_REFUSED, "content filter"
    if not text:
        return STATUS_ERROR, f"empty (finish_reason {finish_reason})"
    if REFUSAL_RE.search(text):
        return STATUS_REFUSED, f"refusal: {text[:120]}"
    if finish_reason == "length":
        return STATUS_ERROR, f"truncated at max tokens ({words(text)} words)"
    if language == "en" and not looks_english(text, preset.prose):
        return STATUS_ERROR, "wrong language (expected en)"
    lo, hi = preset.word_range(word_ranges)
    n = words(text)
    if n < lo:
        return STATUS_ERROR, f"too short: {n} words < {lo} for {preset.name}"
    if n > hi:
        return STATUS_ERROR, f"too long: {n} words > {hi} for {preset.name}"
    return STATUS_OK, None
