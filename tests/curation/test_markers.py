"""Completion markers vouch for the files they name: sizes recorded when written, checked on every rerun."""

import json

from curation.markers import marker_path, read_marker, read_markers, stale_reason, write_marker


def test_a_marker_holds_while_its_files_are_as_recorded(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x" * 10)
    record = write_marker(marker_path(tmp_path, "a"), {"shard": "a"}, tmp_path, ["a.parquet"])
    assert record == {"shard": "a", "files": {"a.parquet": 10}} == read_marker(marker_path(tmp_path, "a"))
    assert stale_reason(record, tmp_path) is None
    assert read_markers(tmp_path) == [record]
    assert not list(marker_path(tmp_path, "a").parent.glob(".*.tmp"))  # written by rename


def test_a_changed_or_missing_file_or_marker_is_stale(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x" * 10)
    record = write_marker(marker_path(tmp_path, "a"), {}, tmp_path, ["a.parquet"])
    (tmp_path / "a.parquet").write_bytes(b"x" * 4)
    assert stale_reason(record, tmp_path) == "a.parquet is 4 bytes, not the 10 its marker records"
    (tmp_path / "a.parquet").unlink()
    assert stale_reason(record, tmp_path) == "a.parquet missing"
    assert stale_reason(None, tmp_path) == stale_reason({"shard": "a"}, tmp_path) == "no marker"


def test_an_unreadable_marker_reads_as_none(tmp_path):
    path = marker_path(tmp_path, "a")
    assert read_marker(path) is None
    path.parent.mkdir()
    path.write_text("{not json")
    assert read_marker(path) is None and read_markers(tmp_path) == []
    path.write_text(json.dumps([1, 2]))
    assert read_marker(path) is None
