"""Completion markers for `lensforge run`: a stage is skipped when its marker holds the key of the current config.

A stage's key hashes what decides its outputs: its resolved config section (minus settings that only say *where*
or *how fast*, such as an endpoint's URL or the concurrency), the files it reads, and the key of the stage before
it, so that changing the captioner reruns caption, precompute, train, sample and report but not curate.

    key = stage_key("caption", cfg, upstream=keys["curate"])
    if not is_done(data, "caption", key): caption(...); mark_done(data, "caption", key, {"captions": n})

The marker is written last, atomically: a run killed inside a stage has no marker for it, and the rerun calls the
stage again, which does only what is left (every stage resumes on its own).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.atomic import write_json

MARKER_DIR = ".lensforge/stages"

# Settings that change where or how fast a stage works, not what it writes. Excluded from the keys so that the
# demo's endpoints (a fresh loopback port on every start) and a retuned concurrency do not redo finished work.
OPERATIONAL = {
    "curate": {"download.threads", "download.processes", "ray_address"},
    "caption": {"base_url", "api_key_env", "concurrency", "ray_address", "workers", "progress"},
    "precompute": {"ray_address", "progress"},
    "train": {"progress", "log_every"},
}

HASH_WHOLE_FILE_BYTES = 1 << 30  # larger inputs are keyed by size and modification time


def _drop(values: dict[str, Any], dotted: set[str]) -> dict[str, Any]:
    out = {}
    for name, value in values.items():
        inner = {d.partition(".")[2] for d in dotted if d.startswith(name + ".")}
        if name in dotted:
            continue
        out[name] = _drop(value, inner) if inner and isinstance(value, dict) else value
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (size and mtime past 1 GiB); a directory hashes its files' digests in name order."""
    path = Path(path)
    if path.is_dir():
        parts = [f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    stat = path.stat()
    if stat.st_size > HASH_WHOLE_FILE_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_key(stage: str, cfg: BaseModel | dict | None, upstream: str = "", **inputs: Any) -> str:
    values = json.loads(cfg.model_dump_json()) if isinstance(cfg, BaseModel) else (cfg or {})
    payload = {"stage": stage, "config": _drop(values, OPERATIONAL.get(stage, set())), "upstream": upstream,
               "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_path(root: str | Path, stage: str) -> Path:
    return Path(root) / MARKER_DIR / f"{stage}.json"


def read_marker(root: str | Path, stage: str) -> dict | None:
    path = marker_path(root, stage)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(root: str | Path, stage: str, key: str) -> bool:
    marker = read_marker(root, stage)
    return bool(marker) and marker.get("key") == key


def _plain(value: Any) -> Any:
    """JSON-ready: tuple keys such as (variant, status) become "variant/status"."""
    if isinstance(value, dict):
        return {"/".join(map(str, k)) if isinstance(k, tuple) else str(k): _plain(v) for k, v in value.items()}
    return value


def mark_done(root: str | Path, stage: str, key: str, summary: dict | None = None, seconds: float = 0.0) -> None:
    write_json(marker_path(root, stage), {"stage": stage, "key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "seconds": round(seconds, 1), "summary": _plain(summary or {})}, fsync=True)


def clear_from(root: str | Path, stages: list[str]) -> None:
    """Forget the markers of `stages` (a rerun of an upstream stage makes them stale)."""
    for stage in stages:
        marker_path(root, stage).unlink(missing_ok=True)
