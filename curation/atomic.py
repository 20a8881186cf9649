"""Writes that a kill cannot leave half done: a file under a temporary name in the same folder, then renamed; a
whole folder staged beside its final name, then swapped in.

    write_text(path, text, fsync=True)      # fsync where the data is money or state (ledgers, journals, markers)
    swap_folder(staged, final)              # DATA/.manifest.new → DATA/manifest; a reader never sees it half made
    recover_folder(final)                   # after a kill mid-swap: the complete staged folder, or the old one

A rename within one filesystem is atomic (POSIX rename(2)); a folder cannot be renamed over a non-empty one, so a
swap is two renames (final → .NAME.old, staged → final). `recover_folder` finishes one a kill interrupted: a staged
folder counts only once its `_SUCCESS` file is there (written last; a leading `_` keeps Parquet readers out).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DONE_FILE = "_SUCCESS"


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:  # the rename itself reaches the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode(), fsync)


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
