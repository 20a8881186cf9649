"""Writes that a kill cannot leave half done: a file under a temporary name in the same folder, then renamed; a
whole folder staged beside its final name, then swapped in.

    write_text(path, text, fsync=True)      # fsync where the data is money or state (ledgers, journals, markers)
    write_json(path, obj, fsync=True)       # the same, json.dumps(obj, indent=1) + newline
    with atomic_path(path) as tmp:          # for writers that want a path (pq.write_table, safetensors, tarfile)
        pq.write_table(table, tmp)          # renamed over `path` only when the block ends without an exception
    publish(tmp, path, fsync=True)          # a file written elsewhere under a temporary name, renamed into place
    sync_tree(folder)                       # every file of a folder on disk (a checkpoint before its rename)
    swap_folder(staged, final)              # DATA/.manifest.new → DATA/manifest; a reader never sees it half made
    recover_folder(final)                   # after a kill mid-swap: the complete staged folder, or the old one

A rename within one filesystem is atomic (POSIX rename(2)); a folder cannot be renamed over a non-empty one, so a
swap is two renames (final → .NAME.old, staged → final). `recover_folder` finishes one a kill interrupted: a staged
folder counts only once its `_SUCCESS` file is there (written last; a leading `_` keeps Parquet readers out).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DONE_FILE = "_SUCCESS"


def sync_dir(folder: str | Path) -> None:
    """fsync a folder: a rename in it reaches the disk only with the folder's entry."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | Path) -> None:
    """fsync every file and folder under `folder` (then the folder itself)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_dir():
            sync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sync_dir(folder)


def publish(tmp: str | Path, path: str | Path, fsync: bool = False) -> Path:
    """Rename the finished temporary file `tmp` over `path` (same folder); with `fsync`, its bytes first and the
    rename after reach the disk."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        sync_dir(Path(path).parent)
    return Path(path)


def temporary_name(path: str | Path) -> Path:
    """Where `path` is written before its rename: hidden, in the same folder (a rename across filesystems is a
    copy), and ending in .tmp, which no reader globs for."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write `path` through; published when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path, fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode(), fsync)


def write_json(path: str | Path, obj, fsync: bool = False, **dumps) -> Path:
    """`obj` as JSON (indent=1 unless `dumps` says otherwise; non-JSON values via str) plus a newline."""
    return write_text(path, json.dumps(obj, **({"indent": 1, "default": str} | dumps)) + "\n", fsync)


def staging_dir(final: str | Path) -> Path:
    """Where the next version of `final` is built (emptied first: a leftover from a kill is incomplete)."""
    final = Path(final)
    staged = final.with_name(f".{final.name}.new")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def swap_folder(staged: Path, final: str | Path) -> Path:
    """Mark `staged` complete and put it in `final`'s place; the old version is removed last."""
    final = Path(final)
    (staged / DONE_FILE).write_text("")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_folder(final: str | Path) -> None:
    """Finish a swap a kill interrupted between its two renames (nothing to do otherwise)."""
    final = Path(final)
    if final.exists():
        return
    staged, old = final.with_name(f".{final.name}.new"), final.with_name(f".{final.name}.old")
    if (staged / DONE_FILE).is_file():
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    elif old.is_dir():
        os.replace(old, final)
