"""Captioner prompt presets, chosen by name (DiT-style registry; `lensforge caption --variants dense,short`).

    list_presets()                               # ['dense', 'medium', 'short', 'tags']
    resolve_variants(["dense", "mine=p.txt"])    # {'dense': Preset(...), 'mine': Preset(...)}

Contract with the local endpoint (captioning/endpoint/), which picks the caption density from the prompt text:
the dense instruction says "about 100 words", medium "about 40 words", short "one sentence", tags
"comma-separated tags". Bump `version` whenever a prompt changes meaning: it is part of `prompt_id`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

SYSTEM = ("You write image captions for training a text-to-image model. Describe only what is visible; "
          "do not speculate about intent, identity or anything outside the frame.")

# Lens re-captioned its images with GPT-4.1 at ~109 words each: the dense preset aims at that.
DENSE = ("Describe this image in one paragraph of about 100 words. Cover the salient objects with their attributes "
         "(colour, size, material, shape), how many there are, their spatial relations, the background and the "
         "style or medium of the image. Quote any visible text verbatim in double quotes; if there is none, do not "
         "mention text at all (never write \"no visible text\"). Plain prose: no lists, no preamble.")
MEDIUM = ("Describe this image in about 40 words: the main objects with their colours and counts, where they are, "
          "and the background. Quote any visible text verbatim. Plain prose, no preamble.")
SHORT = "Describe this image in one sentence of at most 15 words, naming the most salient subject. No preamble."
TAGS = ("List comma-separated tags for this image: objects, colours, counts, background, style, and any visible "
        "text verbatim. Lowercase, no sentences, no preamble.")


@dataclass(frozen=True)
class Preset:
    name: str
    instruction: str
    system: str = SYSTEM
    version: str = "1"
    target_words: int = 100  # what the dry run expects per caption
    min_words: int = 1  # the checks' accepted range
    max_words: int = 10_000
    max_tokens: int = 400  # completion cap: bounds the cost of a runaway answer (and the budget reservation)
    prose: bool = True  # sentences (the stopword language check applies) rather than a tag list

    @property
    def prompt_id(self) -> str:
        digest = hashlib.sha256((self.system + self.instruction + self.version).encode()).hexdigest()[:8]
        return f"{self.name}@{digest}"

    def word_range(self, overrides: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
        return tuple((overrides or {}).get(self.name, (self.min_words, self.max_words)))


# Word ranges are loose sanity bounds (a 5-word "dense" caption means something broke), not the target: a plain
# image (one object on a flat background) honestly gets a short dense caption.
PRESETS: dict[str, Preset] = {
    "dense": Preset("dense", DENSE, target_words=100, min_words=12, max_words=220, max_tokens=400),
    "medium": Preset("medium", MEDIUM, target_words=40, min_words=6, max_words=90, max_tokens=200),
    "short": Preset("short", SHORT, target_words=12, min_words=2, max_words=25, max_tokens=60),
    "tags": Preset("tags", TAGS, target_words=20, min_words=2, max_words=100, max_tokens=200, prose=False),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def load_prompt_file(name: str, path: str | Path) -> Preset:
    """A user prompt: the file's text is the instruction; the version is its hash (part of prompt_id already)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file for variant {name!r} not found: {path}")
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"prompt file {path} is empty")
    return Preset(name, text, version="file", target_words=max(len(text.split()), 50), max_tokens=600)


def resolve_variants(variants: list[str], prompt_file: str | None = None) -> dict[str, Preset]:
    """Variant specs (`dense`, `mine=path/to/prompt.txt`, or the stem of `prompt_file`) → presets, in order."""
    extra = {Path(prompt_file).stem: prompt_file} if prompt_file else {}
    out: dict[str, Preset] = {}
    for spec in variants:
        name, sep, path = (part.strip() for part in spec.partition("="))
        if sep:
            out[name] = load_prompt_file(name, path)
        elif name in PRESETS:
            out[name] = PRESETS[name]
        elif name in extra:
            out[name] = load_prompt_file(name, extra[name])
        else:
            known = ", ".join(list_presets() + list(extra))
            raise LookupError(f"unknown caption preset {name!r}; known: {known} (or name=path/to/prompt.txt)")
    return out


def json_instruction(presets: list[Preset]) -> str:
    """One request for several variants: each on its own line as `- <variant>: <instruction>`, answered as JSON."""
    lines = [f"- {p.name}: {p.instruction}" for p in presets]
    keys = ", ".join(f'"{p.name}"' for p in presets)
    return ("Write one caption of this image for each variant below.\n" + "\n".join(lines)
            + f"\nAnswer with a JSON object with exactly the keys {keys}, each holding that variant's caption "
              "as a string.")
