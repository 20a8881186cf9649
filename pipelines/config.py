"""One YAML file, a section per stage; every command reads its own section.

    lensforge curate --config configs/demo.yaml --set curate.min_area=147456 ...

Each stage owns its typed config (`curation/config.py`, ...); this module only knows which class reads which
section, applies dotted overrides, and writes the resolved section next to the stage's output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from captioning.config import CaptionConfig
from curation.config import CurateConfig
from pipelines.run_config import RunConfig
from scenes.config import ScenesConfig
from training.precompute_config import PrecomputeConfig
from training.train_config import TrainConfig

# Section name -> the stage's config class. Later stages add theirs here.
SECTIONS: dict[str, type[BaseModel]] = {
    "scenes": ScenesConfig,
    "curate": CurateConfig,
    "caption": CaptionConfig,
    "precompute": PrecomputeConfig,
    "train": TrainConfig,
    "run": RunConfig,
}

C = TypeVar("C", bound=BaseModel)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="lensforge YAML file; this command reads its own section")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="dotted override, e.g. --set curate.min_area=147456 (repeatable; VALUE is parsed as YAML)",
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"unreadable config {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config {path}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`a.b.c=value` sets raw['a']['b']['c'] = yaml(value), creating mappings on the way."""
    path, sep, value = override.partition("=")
    if not sep or not path:
        raise ValueError(f"override {override!r} is not SECTION.KEY=VALUE")
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value) if value else None


def load_section(section: str, config_file: str | None, overrides: list[str], **flags: Any) -> BaseModel:
    """The typed config of one section: file < --set overrides < explicit command-line flags (not None)."""
    cls = SECTIONS[section]
    raw = read_yaml(config_file) if config_file else {}
    for override in overrides:
        if override.partition(".")[0] not in SECTIONS:
            raise ValueError(f"override {override!r}: unknown section; known: {', '.join(SECTIONS)}")
        apply_override(raw, override)
    values = dict(raw.get(section) or {})
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise ValueError(f"invalid config: {problems}") from None


def save_resolved(cfg: BaseModel, section: str, out_dir: str | Path) -> Path:
    """Write the resolved section next to the stage's output (`OUT/config.<section>.yaml`)."""
    out = Path(out_dir) / f"config.{section}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({section: json.loads(cfg.model_dump_json())}, sort_keys=False))
    return out
