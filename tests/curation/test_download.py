"""A finished download shard counts only while its files are whole: `verified_shards` over shards laid out as
img2dataset writes them (`{shard}.tar`, `.parquet`, `_stats.json` last), then deleted, cut or changed by hand."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.download import download_stamp, verified_shards
from curation.markers import marker_path


def write_shard(folder, shard: str, keys: list[str], failed: tuple[str, ...] = (), run: int = 0) -> None:
    """One shard in img2dataset's layout: per success `{key}.jpg` + `{key}.json` in the tar, a row per key in the
    parquet, and `_stats.json` (start time `run`: a later download of the shard has other stats)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{shard}.tar", "w") as tar:
        for key in keys:
            if key in failed:
                continue
            for ext, data in ((".jpg", b"\xff\xd8" + key.encode() * 500), (".json", b"{}")):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    status = ["failed_to_download" if k in failed else "success" for k in keys]
    pq.write_table(pa.table({"key": keys, "status": status}), folder / f"{shard}.parquet")
    (folder / f"{shard}_stats.json").write_text(json.dumps({"count": len(keys), "start_time": run}))


@pytest.fixture
def download_dir(tmp_path):
    folder = tmp_path / "download"
    write_shard(folder, "00000", ["000000000", "000000001", "000000002"])
    write_shard(folder, "00001", ["000010000", "000010001"], failed=("000010001",))
    return folder


def test_whole_shards_are_done_and_get_a_marker_with_their_sizes(download_dir, capsys):
    assert verified_shards(download_dir) == ["00000", "00001"]
    record = json.loads(marker_path(download_dir, "00000").read_text())
    assert record["files"] == {name: (download_dir / name).stat().st_size for name in ("00000.tar", "00000.parquet")}
    assert download_stamp(download_dir, "00000") == record["stamp"] != download_stamp(download_dir, "00001")
    assert verified_shards(download_dir) == ["00000", "00001"]  # the second look checks sizes only
    assert capsys.readouterr().out == ""


def cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def header_at(tar_path, name: str) -> int:
    """Where member `name`'s header starts in the tar."""
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name).offset


def end_of_members(tar_path) -> int:
    """Where the last member's (padded) data ends: the end blocks follow."""
    with tarfile.open(tar_path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


SECOND = "000000001.jpg"


@pytest.mark.parametrize("first_seen", [True, False], ids=["before-its-marker", "after-its-marker"])
@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: (d / "00000.tar").unlink(), "00000.tar missing"),
        (lambda d: (d / "00000.parquet").unlink(), "00000.parquet missing"),
        (lambda d: cut(d / "00000.tar", header_at(d / "00000.tar", SECOND) + 600), "00000.tar is cut"),  # an image
        (lambda d: cut(d / "00000.tar", header_at(d / "00000.tar", SECOND)), "00000.tar is cut"),  # between members
        (lambda d: cut(d / "00000.tar", end_of_members(d / "00000.tar")), "00000.tar is cut"),  # no end blocks
        (lambda d: cut(d / "00000.parquet", 40), "00000.parquet unreadable"),
    ],
    ids=["tar-deleted", "parquet-deleted", "tar-cut-in-image", "tar-cut-at-member", "tar-without-end", "parquet-cut"],
)
def test_a_deleted_or_cut_file_removes_the_shard_to_download_it_again(download_dir, capsys, damage, why, first_seen):
    name = why.split()[0]
    if not first_seen:
        verified_shards(download_dir)  # the marker records the sizes of the whole files
        whole = (download_dir / name).stat().st_size
    damage(download_dir)
    if not first_seen and "missing" not in why:  # past the marker, the check is the size it recorded
        why = f"{name} is {(download_dir / name).stat().st_size} bytes, not the {whole} its marker records"
    assert verified_shards(download_dir) == ["00001"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"curate: download shard 00000: {why}"), out
    assert out[0].endswith("; downloading it again")
    # img2dataset's incremental mode skips a shard with `_stats.json`: gone, so it is downloaded again
    assert not list(download_dir.glob("00000*")) and not marker_path(download_dir, "00000").exists()
    assert (download_dir / "00001.tar").exists()


def test_a_shard_downloaded_again_is_checked_again_and_gets_a_new_stamp(download_dir):
    verified_shards(download_dir)
    before = download_stamp(download_dir, "00000")
    write_shard(download_dir, "00000", ["000000000", "000000001"], run=1)  # another size than the marker says
    assert verified_shards(download_dir) == ["00000", "00001"]  # a new `_stats.json`: not the marker's download
    assert download_stamp(download_dir, "00000") not in (None, before)
