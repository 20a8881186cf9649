"""common/data_lock.py: one writer per folder. A second process is refused in one line naming the holder; the
lock of a SIGKILLed process is taken over, and said so; a process's own nested locks do not block it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common.data_lock import LOCK_FILE, FolderBusy, data_lock
from pipelines import cli

HOLD = "from common.data_lock import data_lock; import sys, time\nwith data_lock(sys.argv[1], 'caption'):\n" \
       "    print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(FolderBusy, match=rf"being written by lensforge caption \(pid {holder.pid} on "):
        with data_lock(tmp_path, "curate"):
            pass


def test_the_cli_refuses_in_one_line_and_touches_nothing(tmp_path, holder, capsys):
    code = cli.main(["precompute", "--data", str(tmp_path), "--codec", "pixel", "--text-encoder", "minilm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is being written by lensforge caption" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_the_lock_of_a_killed_process_is_taken_over_and_said_so(tmp_path, holder, capsys):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with data_lock(tmp_path, "caption"):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["stage"] == "caption"
    out = capsys.readouterr().out
    assert f"taking over the lock of caption (pid {holder.pid}" in out and "no longer running" in out
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit leaves no owner


def test_nested_locks_in_one_process_and_release(tmp_path):
    with data_lock(tmp_path, "run"):
        with data_lock(tmp_path, "curate"):
            pass
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and time.monotonic() - started < 60  # released: another process takes it


def test_a_folder_made_only_for_the_lock_is_removed_with_it(tmp_path):
    with data_lock(tmp_path / "run", "train"):
        assert (tmp_path / "run" / LOCK_FILE).is_file()
    assert not (tmp_path / "run").exists()
