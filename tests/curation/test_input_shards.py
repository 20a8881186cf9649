"""Input shards (curation/input_shards.py): keys stable per list and row, a later list at the next free shard,
one-line errors for a changed or unexpected list, the guard's static verdict in the shard, refused URIs blanked."""

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curation.input_shards import _cut_batches, read_lists, register, write_shard
from curation.safety import UrlPolicy


def url_list(path, n, start=0):
    pd.DataFrame({"url": [f"http://127.0.0.1/{i}.jpg" for i in range(start, start + n)],
                  "caption": [f"image {i}" for i in range(start, start + n)]}).to_parquet(path)
    return path


def test_lists_resume_and_a_later_list_starts_at_the_next_free_shard(tmp_path):
    first, second = url_list(tmp_path / "a.parquet", 25), url_list(tmp_path / "b.parquet", 7)
    data = tmp_path / "data"
    [entry] = register(data, first, shard_size=10)
    assert entry.first_shard == 0 and entry.shards is None
    assert register(data, first, shard_size=10) == [entry]  # the same list again: resumed
    with pytest.raises(ValueError, match="not cut through"):
        register(data, second, shard_size=10, add=True)
    size, lists = read_lists(data)
    lists[0].shards, lists[0].rows = 3, 25  # what `cut` records when it is through
    from curation.input_shards import _save

    _save(data, size, lists)
    with pytest.raises(ValueError, match="pass --add"):
        register(data, second, shard_size=10)
    with pytest.raises(ValueError, match="download.shard_size: 10"):
        register(data, second, shard_size=20, add=True)
    _, added = register(data, second, shard_size=10, add=True)
    assert added.first_shard == 3  # keys 30 … 36: shard 2 keeps its free tail, no key moves
    url_list(first, 26)
    with pytest.raises(ValueError, match="changed since"):
        register(data, first, shard_size=10)


def test_a_list_is_cut_at_shard_boundaries_across_batches_and_files(tmp_path, monkeypatch):
    import curation.inputs

    monkeypatch.setattr(curation.inputs, "BATCH_ROWS", 4)  # batches cross shard boundaries
    folder = tmp_path / "urls"
    folder.mkdir()
    url_list(folder / "a.parquet", 9)
    url_list(folder / "b.parquet", 8, start=9)
    cut = list(_cut_batches(folder, "url", "caption", 5))
    assert [i for i, _ in cut] == [0, 1, 2, 3] and [t.num_rows for _, t in cut] == [5, 5, 5, 2]
    assert sum((t["url"].to_pylist() for _, t in cut), []) == [f"http://127.0.0.1/{i}.jpg" for i in range(17)]


def test_a_shard_carries_keys_uris_and_the_guards_verdict(tmp_path):
    rows = pd.DataFrame({"url": ["http://127.0.0.1/画像.jpg", "ftp://127.0.0.1/x.jpg", "http://127.0.0.2/y.jpg"],
                         "alt_text": ["a", None, "c"], "license": ["cc", "x", "y"]})
    import pyarrow as pa

    path = tmp_path / "00004.parquet"
    write_shard(pa.Table.from_pandas(rows, preserve_index=False), 40, str(path),
                UrlPolicy(allow_hosts=("127.0.0.1",)))
    shard = pq.read_table(path).to_pandas()
    assert list(shard["lf_key"]) == ["0000000040", "0000000041", "0000000042"]
    assert shard.loc[0, "uri"] == "http://127.0.0.1/%E7%94%BB%E5%83%8F.jpg" and shard.loc[0, "refused"] is None
    assert shard.loc[1, "uri"] == "" and "scheme 'ftp'" in shard.loc[1, "refused"]  # never fetched
    assert shard.loc[2, "uri"] == "" and shard.loc[2, "refused"].startswith("unsafe url: ")
    assert list(shard["url"]) == list(rows["url"]) and list(shard["license"]) == ["cc", "x", "y"]
