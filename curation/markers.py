"""Completion markers that vouch for files: a marker is never trusted over the data (STYLE.md 6).

    write_marker(marker_path(folder, "00003"), {"shard": "00003"}, folder, ["00003.parquet"])  # last, fsync'd
    why = stale_reason(read_marker(marker_path(folder, "00003")), folder)  # None, or "00003.parquet missing" ...

A marker is a small JSON record written after the files it names, with their sizes under `files`; a rerun honours
it only while every one of them is there with that size (a deleted or cut file is redone, and the user told). The
download shards (DATA/download/_done/) and the filtered shards (DATA/filtered/_done/) keep theirs here.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import write_json

MARKER_DIR = "_done"  # a leading "_" keeps pandas, pyarrow, Ray Data and img2dataset's `*.json` glob out of it


def marker_path(folder: str | Path, shard: str) -> Path:
    return Path(folder) / MARKER_DIR / f"{shard}.json"


def read_marker(path: Path) -> dict | None:
    """The record, or None when there is none (a marker is written whole by rename; a hand-edited one is redone)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_markers(folder: str | Path) -> list[dict]:
    """Every marker's record under `folder`, in shard order."""
    records = (read_marker(p) for p in sorted((Path(folder) / MARKER_DIR).glob("*.json")))
    return [r for r in records if r is not None]


def write_marker(path: Path, record: dict, folder: str | Path, names: list[str]) -> dict:
    """Write `record` plus the sizes of the files `names` (in `folder`) it vouches for; returns what was written."""
    record = {**record, "files": {name: (Path(folder) / name).stat().st_size for name in names}}
    write_json(path, record, fsync=True)  # after the files: it says they are complete
    return record


def stale_reason(record: dict | None, folder: str | Path) -> str | None:
    """Why the files a marker vouches for are not as it recorded them, or None when they are."""
    if not record or not record.get("files"):
        return "no marker"
    for name, size in record["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not the {size} its marker records"
    return None
