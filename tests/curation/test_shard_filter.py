"""A filtered shard's marker holds only for this filter config, this download of the shard and its part as
written; otherwise the shard is filtered again, and the run says why."""

import pytest

from curation.markers import marker_path, write_marker
from curation.shard_filter import shard_done


@pytest.fixture
def filtered(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"p" * 100)
    write_marker(marker_path(tmp_path, "00000"), {"config_hash": "cfg", "download_stamp": "dl-1"}, tmp_path,
                 ["00000.parquet"])
    return tmp_path


def test_done_with_the_same_config_download_and_part(filtered, capsys):
    assert shard_done(filtered, "00000", "cfg", "dl-1")
    assert not shard_done(filtered, "00001", "cfg", "dl-1")  # no marker
    assert not shard_done(filtered, "00000", "other-cfg", "dl-1")  # a config change is expected: silent
    assert capsys.readouterr().out == ""


def test_a_shard_downloaded_again_is_filtered_again(filtered, capsys):
    assert not shard_done(filtered, "00000", "cfg", "dl-2")
    assert capsys.readouterr().out.strip() == (
        "curate: filtered shard 00000: made from an earlier download of the shard; filtering that shard again")


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.unlink(), "00000.parquet missing"),
    (lambda p: p.write_bytes(b"p" * 10), "00000.parquet is 10 bytes, not the 100 its marker records"),
])
def test_a_deleted_or_cut_part_is_filtered_again(filtered, capsys, damage, why):
    damage(filtered / "00000.parquet")
    assert not shard_done(filtered, "00000", "cfg", "dl-1")
    assert capsys.readouterr().out.strip() == f"curate: filtered shard 00000: {why}; filtering that shard again"
