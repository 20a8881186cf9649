"""The prompts `lensforge rl` trains on, and the rule reward of the synthetic scenes (issue 17).

    prompts = read_prompts("prompts.jsonl")        # one prompt a line, or JSONL with a `prompt` field
    reward = SceneReward()                          # needs prompts that carry their category and target scene
    raw = reward.score(prompts, images)             # one 0/1 per image: GenEval's rule for the category

A prompt file is plain text (one prompt a line; blank lines skipped) or JSONL (`.jsonl`): `prompt` is required;
`category` and `scene` (a `Scene.to_dict()`) let the `scenes` reward check an image, `rubric` (a list of yes / no
questions) spares the judge writing one. `lensforge scenes prompts` writes such files from the adherence
categories, with another seed than `lensforge evaluate`'s, so training never sees an evaluation prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scenes.adherence import CATEGORIES, ImageLike, passes
from scenes.parse import parse
from scenes.scene import Scene


@dataclass(frozen=True)
class RLPrompt:
    text: str
    category: str | None = None  # a scenes adherence category (the `scenes` reward's rule)
    scene: Scene | None = None  # the target the prompt describes
    rubric: tuple[str, ...] = field(default_factory=tuple)  # yes / no questions for the judge; empty: generated

    def to_dict(self) -> dict:
        out: dict = {"prompt": self.text}
        if self.category:
            out["category"] = self.category
        if self.scene is not None:
            out["scene"] = self.scene.to_dict()
        if self.rubric:
            out["rubric"] = list(self.rubric)
        return out


def _from_record(record: object, where: str) -> RLPrompt:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f"{where}: a JSON object with a non-empty \"prompt\" string is needed")
    category = record.get("category")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"{where}: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    try:
        scene = Scene.from_dict(record["scene"]) if record.get("scene") is not None else None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: unreadable \"scene\": {err}") from None
    rubric = record.get("rubric") or []
    if not isinstance(rubric, list) or not all(isinstance(q, str) and q.strip() for q in rubric):
        raise ValueError(f"{where}: \"rubric\" must be a list of non-empty questions")
    return RLPrompt(record["prompt"].strip(), category, scene, tuple(rubric))


def read_prompts(path: str | Path) -> list[RLPrompt]:
    """The prompts of a text or JSONL file; a bad line is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            prompts.append(_from_record(record, f"{path}:{number}"))
        else:
            prompts.append(RLPrompt(line.strip()))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def write_prompts(path: str | Path, prompts: Sequence[RLPrompt]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in prompts), encoding="utf-8")
    return path


class SceneReward:
    """The rule reward: the image parsed back (`scenes.parse`) and checked by its category's adherence rule."""

    name = "scenes"

    def check(self, prompts: Sequence[RLPrompt]) -> None:
        """Refuse, before any rollout, prompts the rule cannot score."""
        missing = [i for i, p in enumerate(prompts) if p.category is None or p.scene is None]
        if missing:
            raise ValueError(f"the scenes reward needs every prompt's category and scene ({len(missing)} lack them, "
                             f"e.g. {prompts[missing[0]].text!r}): write the file with `lensforge scenes prompts`")

    last: dict[str, float] = {}  # per-step figures the RL loop logs (the judge's cost; none here)

    def close(self) -> None:
        """Nothing to release (the judge closes its journal)."""

    def score(self, prompts: Sequence[RLPrompt], images: Sequence[ImageLike], step: int = 0) -> list[float]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        self.check(prompts)
        return [float(passes(p.category, p.scene, parse(image))) for p, image in zip(prompts, images)]
