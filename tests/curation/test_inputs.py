"""The input URL list: Parquet, CSV or JSONL, a file or a folder; extra columns carried; clear errors."""

import pandas as pd
import pytest

from curation.inputs import read_url_list


def test_formats_and_folders_give_the_same_rows(tmp_path):
    df = pd.DataFrame({"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["one", None], "license": ["cc", "x"]})
    df.to_parquet(tmp_path / "u.parquet")
    df.to_csv(tmp_path / "u.csv", index=False)
    df.to_json(tmp_path / "u.jsonl", orient="records", lines=True)
    for name in ("u.parquet", "u.csv", "u.jsonl"):
        rows, carried = read_url_list(tmp_path / name)
        assert list(rows["key"]) == ["0000000000", "0000000001"]
        assert list(rows["alt_text"]) == ["one", None] and carried == ["license"]
    folder = tmp_path / "parts"
    folder.mkdir()
    df.iloc[:1].to_parquet(folder / "a.parquet")
    df.iloc[1:].to_parquet(folder / "b.parquet")
    rows, _ = read_url_list(folder)
    assert list(rows["url"]) == list(df["url"])  # files in sorted order, keys continue across files


def test_columns_that_would_shadow_the_manifest_are_renamed(tmp_path):
    pd.DataFrame({"link": ["http://a/1.jpg"], "alt": ["x"], "status": ["live"], "keep": [1]}).to_csv(
        tmp_path / "u.csv", index=False)
    rows, carried = read_url_list(tmp_path / "u.csv", url_col="link", caption_col="alt")
    assert carried == ["input_status", "input_keep"] and rows.loc[0, "alt_text"] == "x"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.parquet", "URL list not found"),
        (lambda p: (p / "u.txt").write_text("x") and p / "u.txt", "unsupported format"),
        (lambda p: (p / "u.parquet").write_text("not parquet") and p / "u.parquet", "cannot read URL list"),
        (lambda p: (p / "e").mkdir() or p / "e", "no .parquet, .csv or .jsonl files"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_url_list(make(tmp_path))


EMPTY = pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)})


@pytest.mark.parametrize(
    "name, write",
    [
        ("u.parquet", EMPTY.to_parquet),
        ("u.csv", lambda path: path.write_text("url,caption\n")),
        ("u.jsonl", lambda path: path.write_text("")),
    ],
)
def test_a_list_with_no_rows_is_a_clear_error(tmp_path, name, write):
    """Not a merge error three steps later (an empty frame's key column is float)."""
    write(tmp_path / name)
    with pytest.raises(ValueError, match=f"^URL list {tmp_path / name} has no URLs"):
        read_url_list(tmp_path / name)
