"""common/storage.py against a real S3-compatible server on loopback (moto's, tests/conftest.py): the URL list
read in place, and the working copy's sync rules."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from common.storage import Mirror, cache_dir, is_remote, list_files, mirrored
from curation.input_shards import list_source
from curation.inputs import url_batches

REPO = Path(__file__).resolve().parents[2]


def s3(url: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(url)


def upload(local: Path, url: str) -> None:
    fs, path = s3(url)
    with fs.open_output_stream(path) as out:
        out.write(local.read_bytes())


def remote_tree(url: str) -> dict[str, bytes]:
    fs, prefix = s3(url)
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:]: fs.open_input_stream(i.path).read() for i in infos
            if i.type == pafs.FileType.File}


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != ".lensforge-sync.json"}


def test_a_url_list_in_a_bucket_reads_as_the_same_files_on_disk(bucket, tmp_path):
    rows = pa.table({"url": [f"http://127.0.0.1/{i}.jpg" for i in range(7)], "caption": list("abcdefg"),
                     "license": ["cc"] * 7})
    folder = tmp_path / "urls"
    folder.mkdir()
    pq.write_table(rows.slice(0, 4), folder / "a.parquet")
    pacsv.write_csv(rows.slice(4), folder / "b.csv")
    for p in folder.iterdir():
        upload(p, f"{bucket}/urls/{p.name}")
    upload(folder / "a.parquet", f"{bucket}/urls/notes.txt")  # not a list format: left out, as on disk

    assert [f.name for f in list_files(f"{bucket}/urls", (".parquet", ".csv"))] == ["a.parquet", "b.csv"]
    ours = pa.concat_tables(url_batches(f"{bucket}/urls/"))
    assert ours.equals(pa.concat_tables(url_batches(folder)))
    assert ours.num_rows == 7 and "license" in ours.column_names
    assert pa.concat_tables(url_batches(f"{bucket}/urls/a.parquet")).num_rows == 4
    assert list_source(f"{bucket}/urls/") == f"{bucket}/urls" and not is_remote(str(folder))


def test_a_missing_list_or_bucket_is_one_line(bucket):
    with pytest.raises(FileNotFoundError, match="URL list not found"):
        list(url_batches(f"{bucket}/nothing.parquet"))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        list(url_batches("s3://no-such-bucket-lensforge/urls.parquet"))
    assert "\n" not in str(err.value)


def test_push_then_a_fresh_copy_pulls_the_same_tree_temporaries_stay_local(bucket, tmp_path):
    url = f"{bucket}/data"
    a = tmp_path / "a"
    (a / "manifest").mkdir(parents=True)
    (a / "manifest" / "part-00000.parquet").write_bytes(b"part")
    (a / ".lensforge" / "stages").mkdir(parents=True)
    (a / ".lensforge" / "stages" / "curate.json").write_text("{}")  # stage markers travel
    (a / ".part-00001.parquet.tmp").write_bytes(b"half")            # a kill's leftovers do not
    (a / ".manifest.new").mkdir()
    (a / ".manifest.new" / "part-00000.parquet").write_bytes(b"staged")
    (a / ".lensforge.lock").write_text("pid")
    mirror = Mirror(url, a)
    assert mirror.push() == 2
    assert set(remote_tree(url)) == {"manifest/part-00000.parquet", ".lensforge/stages/curate.json"}
    assert mirror.push() == 0  # nothing changed: nothing sent

    b = tmp_path / "b"
    assert Mirror(url, b).pull() == 2
    assert local_tree(b) == remote_tree(url)


def test_a_local_change_wins_and_a_remote_change_to_an_untouched_file_arrives(bucket, tmp_path):
    url = f"{bucket}/data"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "journal.jsonl").write_text("one\n")
    (a / "marker.json").write_text("v1")
    Mirror(url, a).push()
    mb = Mirror(url, b)
    mb.pull()

    (a / "journal.jsonl").write_text("one\ntwo\n")  # machine A goes on and pushes
    time.sleep(0.01)
    Mirror(url, a).push()
    (b / "marker.json").write_text("b's own")  # machine B changed a file it has not pushed yet
    mb.pull()
    assert (b / "journal.jsonl").read_text() == "one\ntwo\n"  # untouched on B: A's version arrives
    assert (b / "marker.json").read_text() == "b's own"       # changed on B: B's stays, and push sends it
    mb.push()
    assert remote_tree(url)["marker.json"] == b"b's own"


def test_deletions_travel_both_ways(bucket, tmp_path):
    url = f"{bucket}/data"
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "manifest").mkdir(parents=True)
    for i in range(3):
        (a / "manifest" / f"part-{i}.parquet").write_bytes(b"x" * i)
    ma = Mirror(url, a)
    ma.push()
    (a / "manifest" / "part-2.parquet").unlink()  # a swapped manifest with fewer parts
    ma.pull()                                    # before the push: the deleted part must not come back
    assert not (a / "manifest" / "part-2.parquet").exists()
    ma.push()
    assert set(remote_tree(url)) == {"manifest/part-0.parquet", "manifest/part-1.parquet"}

    mb = Mirror(url, b)
    mb.pull()
    fs, prefix = s3(url)
    fs.delete_file(f"{prefix}/manifest/part-1.parquet")  # removed in the bucket by another machine
    mb.pull()
    assert sorted(p.name for p in (b / "manifest").iterdir()) == ["part-0.parquet"]


def test_mirrored_is_the_path_itself_for_a_path_and_a_synced_copy_for_a_url(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    with mirrored(str(tmp_path / "plain")) as path:
        assert path == str(tmp_path / "plain")
    url = f"{bucket}/run"
    with mirrored(url) as path:
        assert Path(path) == cache_dir(url) and Path(path).is_relative_to(tmp_path / "cache")
        (Path(path) / "a.txt").write_text("kept")
    assert remote_tree(url) == {"a.txt": b"kept"}  # pushed on the way out
    with pytest.raises(RuntimeError), mirrored(url) as path:
        (Path(path) / "b.txt").write_text("done before the error")
        raise RuntimeError("stage failed")
    assert remote_tree(url)["b.txt"] == b"done before the error"  # pushed on an error too


WRITER = """
import sys, time
from pathlib import Path
from common.storage import mirrored
with mirrored(sys.argv[1]) as path:
    for i in range(1000):
        (Path(path) / f"part-{i:04d}").write_text(str(i))
        print(i, flush=True)
        time.sleep(0.05)
"""


def test_a_sigkilled_stage_keeps_what_the_sync_thread_pushed_and_a_fresh_copy_resumes_from_it(bucket, tmp_path):
    url = f"{bucket}/data"
    env = {**os.environ, "LENSFORGE_SYNC_S": "0.2", "LENSFORGE_CACHE": str(tmp_path / "machine-a")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if int(line) >= 20:
            break
    proc.kill()
    proc.wait()
    pushed = remote_tree(url)
    assert len(pushed) >= 10 and all(pushed[k] == str(int(k[5:])).encode() for k in pushed)
    fresh = Mirror(url, tmp_path / "machine-b")
    assert fresh.pull() == len(pushed)
    left = local_tree(tmp_path / "machine-a" / cache_dir(url).name)  # machine A's copy has every part it wrote
    assert set(pushed) <= set(left) and len(left) >= 21


def test_a_missing_bucket_for_data_is_one_line_before_the_stage_runs(s3_server, tmp_path):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-lensforge' .* not found: create it first"):
        Mirror("s3://no-such-bucket-lensforge/data", tmp_path / "copy").pull()
