"""One YAML file, a section per stage; every command reads its own section.

    lensforge curate --config configs/demo.yaml --set curate.min_area=147456 ...

Each stage owns its typed config (`curation/config.py`, ...); this module only knows which class reads which
section, applies dotted overrides, and writes the resolved section next to the stage's output.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from captioning.config import CaptionConfig
from common.atomic import write_text
from curation.config import CurateConfig
from pipelines.run_config import RunConfig
from scenes.config import ScenesConfig
from training.distill_config import DistillConfig
from training.precompute_config import PrecomputeConfig
from training.rl_config import RLConfig
from training.train_config import TrainConfig

# Section name -> the stage's config class. Later stages add theirs here.
SECTIONS: dict[str, type[BaseModel]] = {
    "scenes": ScenesConfig,
    "curate": CurateConfig,
    "caption": CaptionConfig,
    "precompute": PrecomputeConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "rl": RLConfig,
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


class DuplicateKey(yaml.YAMLError):
    """A YAML mapping names a key twice (the message gives the key and both lines)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a mapping that names a key twice (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error below
            if key in seen:
                raise DuplicateKey(f"line {line}: key {key!r} appears twice (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is a `DuplicateKey` error."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except DuplicateKey as err:
        raise ValueError(f"config {path}, {err}") from None
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
    try:
        node[leaf] = parse_yaml(value) if value else None
    except yaml.YAMLError as err:  # DuplicateKey included
        raise ValueError(f"override {override!r}: unreadable value: {str(err).splitlines()[0]}") from None


def load_section(section: str, config_file: str | None, overrides: list[str], reads: tuple[str, ...] | None = None,
                 **flags: Any) -> BaseModel:
    """The typed config of one section: file < --set overrides < explicit command-line flags (not None).
    `reads`: every section the calling command reads; an override of any other section is refused (it would be
    ignored). None: any known section (a command such as `lensforge run` that reads them all)."""
    cls = SECTIONS[section]
    raw = read_yaml(config_file) if config_file else {}
    valid = reads or tuple(SECTIONS)
    for override in overrides:
        name = override.partition("=")[0]
        if name.partition(".")[0] not in valid:
            why = "unknown section" if name.partition(".")[0] not in SECTIONS else "a section this command ignores"
            raise ValueError(f"override {name!r}: {why}; valid sections: {', '.join(valid)}")
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
    return write_text(Path(out_dir) / f"config.{section}.yaml",
                      yaml.safe_dump({section: json.loads(cfg.model_dump_json())}, sort_keys=False))
