"""One writer per output folder: a stage holds an advisory lock on the folder it writes for as long as it runs.

    with data_lock(DATA, "caption"):        # a second caption / curate / precompute on DATA refuses in one line
        ...

The lock is `flock` on FOLDER/.lensforge.lock, which also records who holds it (pid, host, stage, start). The
kernel drops an flock when its process dies, SIGKILL included, so a lock file left by a dead process is free: the
next stage takes it over and says whose it was. Reentrant within a process (`lensforge run` locks DATA once and
its stages lock it again). Folders on network filesystems without flock support are not protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lensforge.lock"
_held: dict[Path, int] = {}  # folder → depth, for this process's own nested locks


class FolderBusy(OSError):
    """Another live process writes this folder."""


@contextmanager
def data_lock(folder: str | Path, stage: str):
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    created = not folder.exists()  # a refused or failed stage leaves no folder it made only for its lock
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder} is being written by {_describe(path)}: wait for it to finish, or stop it "
                             "(a second writer would redo and pay for the same work)") from None
        before = _read(path)
        if before:
            print(f"{stage}: taking over the lock of {before.get('stage')} (pid {before.get('pid')} on "
                  f"{before.get('host')}, started {before.get('started')}), which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        _held[folder] = 1
        try:
            yield
        finally:
            del _held[folder]
            os.ftruncate(fd, 0)  # a clean exit leaves no owner behind
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()
                folder.rmdir()
    finally:
        os.close(fd)  # closing drops the flock


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(path: Path) -> str:
    owner = _read(path)
    if not owner:
        return "another process"
    return (f"lensforge {owner.get('stage')} (pid {owner.get('pid')} on {owner.get('host')}, "
            f"since {owner.get('started')})")
