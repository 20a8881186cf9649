"""common/atomic.py: a folder swap that a kill interrupts at any point leaves the old or the new folder whole,
and the manifest goes through it (write_manifest → read_manifest)."""

import os

import pandas as pd
import pytest

from common import atomic
from curation.manifest import MANIFEST_COLUMNS, read_manifest
from curation.pipeline import write_manifest


def manifest(n: int) -> pd.DataFrame:
    rows = {c: [None] * n for c in MANIFEST_COLUMNS}
    rows.update(key=[f"{i:010d}" for i in range(n)], url=[f"http://127.0.0.1/{i}.jpg" for i in range(n)],
                status=["ok"] * n, keep=[True] * n)
    return pd.DataFrame(rows)


class Killed(Exception):
    pass


def kill_at_rename(monkeypatch, which: int):
    """os.replace raises at its `which`-th call (1-based) inside swap_folder, as a SIGKILL there would stop it."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == which:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("which,expected", [(1, 3), (2, 5)])  # before the old moves away / between the renames
def test_a_manifest_swap_killed_at_either_rename_reads_whole(tmp_path, monkeypatch, which, expected):
    write_manifest(manifest(3), tmp_path)
    kill_at_rename(monkeypatch, which)
    with pytest.raises(Killed):
        write_manifest(manifest(5), tmp_path)
    monkeypatch.undo()
    assert read_manifest(tmp_path).num_rows == expected  # the old (3) or the complete new one (5), never none
    assert len(pd.read_parquet(tmp_path / "manifest")) == expected  # _SUCCESS is no part
    write_manifest(manifest(4), tmp_path)
    assert read_manifest(tmp_path).num_rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest"]  # nothing staged or old left


def test_a_staged_folder_without_its_done_file_is_never_promoted(tmp_path):
    staged = atomic.staging_dir(tmp_path / "manifest")
    (staged / "part-00000.parquet").write_bytes(b"half")  # killed while staging the first manifest
    atomic.recover_folder(tmp_path / "manifest")
    assert not (tmp_path / "manifest").exists()
    with pytest.raises(FileNotFoundError, match="run `lensforge curate` first"):
        read_manifest(tmp_path)


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    atomic.write_text(tmp_path / "a" / "state.json", "1", fsync=True)
    atomic.write_text(tmp_path / "a" / "state.json", "22")
    assert (tmp_path / "a" / "state.json").read_text() == "22"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["state.json"]


def test_atomic_path_publishes_on_success_and_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.json"
    atomic.write_json(path, {"step": 1}, fsync=True)
    assert path.read_text() == '{\n "step": 1\n}\n'
    synced = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd))
    with pytest.raises(Killed):
        with atomic.atomic_path(path, fsync=True) as tmp:
            tmp.write_text("half")
            raise Killed
    assert path.read_text() == '{\n "step": 1\n}\n' and sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    assert not synced  # nothing published, nothing synced
    atomic.write_bytes(path, b"new", fsync=True)
    assert path.read_bytes() == b"new" and len(synced) == 2  # the file's bytes, then the folder's entry


def test_sync_tree_syncs_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x", "a/b/y", "z"):
        (tmp_path / name).write_text(name)
    synced = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    atomic.sync_tree(tmp_path)
    assert sorted(synced) == sorted(str(tmp_path / p) for p in ("a", "a/b", "a/x", "a/b/y", "z", "."))
