"""The input URL list: Parquet, CSV or JSONL (a file, or a folder of them), with a `url` column, an optional
alt-text column and any other columns, which are carried through to the manifest.

    for batch in url_batches(urls, "url", "caption"):   # pa.Table: url, alt_text, carried columns (no keys yet)
        ...                                             # curation/input_shards.py keys and cuts them into shards

The list is read in record batches (pyarrow's streaming readers), never whole: a 10 M-row list costs the driver
one batch. Every batch has the same schema, the union of the files' columns (a column a file lacks is null
there; a column with no values anywhere is a string column), so every input shard and manifest part agrees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.storage import Remote, is_remote, list_files
from curation.manifest import MANIFEST_COLUMNS, make_key

FORMATS = (".parquet", ".csv", ".jsonl", ".json")  # .json is read as JSON lines
BATCH_ROWS = 65_536
_CSV_READ = pacsv.ReadOptions(block_size=16 * 2**20)  # the first block fixes a CSV's column types
_CSV_CONVERT = pacsv.ConvertOptions(strings_can_be_null=True)  # an empty field is null, as pandas reads it
_JSON_READ = pajson.ReadOptions(block_size=16 * 2**20)
RESERVED = ("lf_key", "uri")  # input shard columns of our own (curation/input_shards.py)


def url_files(urls: str | Path) -> list:
    """The list's files, sorted by name: Paths, or `common.storage.Remote` files of an s3:// list (read in place)."""
    if is_remote(urls):
        files = list_files(str(urls), FORMATS)  # the file itself, or the folder's list files; none there: raises
    else:
        urls = Path(urls)
        if not urls.exists():
            raise FileNotFoundError(f"URL list not found: {urls}")
        files = sorted(p for p in urls.iterdir() if p.suffix in FORMATS) if urls.is_dir() else [urls]
    if not files:
        raise FileNotFoundError(f"no .parquet, .csv or .jsonl files in {urls}")
    if len(files) == 1 and files[0].suffix not in FORMATS:  # a single file named directly
        raise ValueError(f"URL list {urls}: unsupported format {files[0].suffix!r} (use .parquet, .csv or .jsonl)")
    return files


def file_size(path) -> int:
    """Bytes of a list file (a Path or a `Remote`)."""
    return path.size if isinstance(path, Remote) else path.stat().st_size


def _open(path):
    """What pyarrow's readers take: the local path, or a seekable file on the bucket."""
    return path.open() if isinstance(path, Remote) else path


def _raw_batches(path) -> Iterator[pa.RecordBatch]:
    """The file's record batches as its reader gives them."""
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(_open(path)).iter_batches(batch_size=BATCH_ROWS)
    elif file_size(path) == 0:  # an empty CSV or JSONL file: no rows (pyarrow's readers refuse it)
        return
    else:
        yield from _reader(path)


def _schema(path) -> pa.Schema:
    if path.suffix == ".parquet":
        return pq.read_schema(_open(path))
    if file_size(path) == 0:
        return pa.schema([])
    with _reader(path) as reader:
        return reader.schema


def _reader(path):
    """The streaming reader of a non-empty CSV or JSONL file (its first block read: its schema is known)."""
    if path.suffix == ".csv":
        return pacsv.open_csv(_open(path), read_options=_CSV_READ, convert_options=_CSV_CONVERT)
    return pajson.open_json(_open(path), read_options=_JSON_READ)


def _carried_name(col: str) -> str:
    """Never let an input column shadow a manifest column (or one of the input shard's own)."""
    return f"input_{col}" if col in MANIFEST_COLUMNS or col in RESERVED else str(col)


@contextmanager
def _read_errors(path) -> Iterator[None]:
    """pyarrow raises several types for a corrupt file; the first line of its message is the one-line error."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"cannot read URL list {path}: {str(err).splitlines()[0]}") from None


def list_schema(files: list, url_col: str, caption_col: str) -> tuple[pa.Schema, list[str]]:
    """(the schema every batch is cast to: url, alt_text, carried columns; the carried names), from the files'
    own schemas (a Parquet footer, a CSV's first block), before any row is read."""
    schemas = []
    for path in files:
        with _read_errors(path):
            schemas.append(_schema(path))
    merged = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    if url_col not in merged.names:
        if all(len(s) == 0 for s in schemas):
            return pa.schema([]), []  # no rows anywhere: `url_batches` says so
        raise ValueError(f"URL list {files[0] if len(files) == 1 else files[0].parent} has no {url_col!r} column "
                         f"(columns: {', '.join(merged.names)})")
    carried = [(c, merged.field(c).type) for c in merged.names if c not in (url_col, caption_col)]
    fields = [pa.field("url", pa.string()), pa.field("alt_text", pa.string())]
    fields += [pa.field(_carried_name(c), pa.string() if pa.types.is_null(t) else t) for c, t in carried]
    return pa.schema(fields), [f.name for f in fields[2:]]


def _conform(batch: pa.RecordBatch, schema: pa.Schema, url_col: str, caption_col: str) -> pa.Table:
    """One raw batch in the list's schema: url (null → ""), alt_text, carried columns (null where absent)."""
    table = pa.Table.from_batches([batch])
    n = table.num_rows
    source = {"url": url_col, "alt_text": caption_col}
    columns = []
    for field in schema:
        name = source.get(field.name) or next((c for c in table.column_names if _carried_name(c) == field.name
                                               and c not in (url_col, caption_col)), None)
        column = table[name] if name in table.column_names else pa.nulls(n, field.type)
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"URL list column {name!r} cannot be read as {field.type}: {str(err).splitlines()[0]}")
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=schema)
    return out.set_column(0, "url", out["url"].fill_null(""))


def url_batches(urls: str | Path, url_col: str = "url", caption_col: str = "caption") -> Iterator[pa.Table]:
    """The list's rows in file order (files sorted by name), batch by batch, in `list_schema`; raises a one-line
    ValueError for an unreadable file, a missing url column or a list with no rows (after reading it through)."""
    files = url_files(urls)
    schema, _ = list_schema(files, url_col, caption_col)
    rows = 0
    for path in files:
        with _read_errors(path):
            for batch in _raw_batches(path):
                if batch.num_rows:
                    rows += batch.num_rows
                    yield _conform(batch, schema, url_col, caption_col)
    if rows == 0:  # nothing to curate; say so here, not as a merge error three steps later
        raise ValueError(f"URL list {urls} has no URLs (0 rows)")


def read_url_list(urls: str | Path, url_col: str = "url", caption_col: str = "caption") -> tuple[pd.DataFrame, list]:
    """The whole list in memory (small lists, tests and benchmarks): (rows with key, url, alt_text and the carried
    columns; the carried column names). `lensforge curate` streams it instead (`url_batches`)."""
    table = pa.concat_tables(url_batches(urls, url_col, caption_col))
    _, carried = list_schema(url_files(urls), url_col, caption_col)
    df = table.to_pandas()
    df.insert(0, "key", [make_key(i) for i in range(len(df))])
    df["alt_text"] = df["alt_text"].astype(object).where(df["alt_text"].notna(), None)
    return df, carried
