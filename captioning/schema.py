"""The captions table: DATA/captions/part-*.parquet, long format, one row per (key, variant).

This module owns the schema (ARCHITECTURE.md, "Captions") and how a part is written; precompute and training import
it from here. A key already `ok` for a variant is never requested again. Only `part-*.parquet` files are the table:
sidecar folders beside them start with `_` (`_journal/`, `_batches/`), which pyarrow datasets and pandas skip, and
hold no .parquet files, which Ray Data's read_parquet skips by extension.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_REFUSED = "refused"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_REFUSED)

# `alt` is the manifest's original alt text, never requested: precompute reads it from the manifest.
ALT_VARIANT = "alt"

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the manifest key
        pa.field("variant", pa.string(), nullable=False),  # prompt preset name: dense, medium, short, tags, ...
        pa.field("text", pa.string()),  # null unless status ok
        pa.field("model", pa.string()),
        pa.field("prompt_id", pa.string()),  # "<preset>@<version hash>"
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),  # why, when status is error or refused
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
CAPTION_COLUMNS = tuple(CAPTIONS_SCHEMA.names)


def captions_dir(data: str | Path) -> Path:
    return Path(data) / "captions"


def write_part(path: Path, rows: list[dict], metadata: dict[bytes, bytes] | None = None) -> Path:
    """Rows → one part at `path`, atomically: written to a hidden temporary name in the same folder, fsynced, renamed,
    and the folder fsynced, so neither a reader nor a crash ever sees half a part. `metadata` goes into the Parquet
    schema's key-value metadata (the journal's compaction records there which journal lines the part holds)."""
    table = pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself is durable only once the folder is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_captions(data: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every caption row of DATA (all parts, all attempts); empty table when none yet."""
    parts = sorted(captions_dir(data).glob("part-*.parquet"))
    if not parts:
        return CAPTIONS_SCHEMA.empty_table() if columns is None else CAPTIONS_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=CAPTIONS_SCHEMA if columns is None else None)
                            for p in parts)


def latest_captions(data: str | Path) -> pa.Table:
    """One row per (key, variant): the ok row if any attempt succeeded, else the latest attempt."""
    import pandas as pd

    df = read_captions(data).to_pandas()
    if df.empty:
        return CAPTIONS_SCHEMA.empty_table()
    df["_ok"] = df["status"] == STATUS_OK
    df = df.sort_values(["key", "variant", "_ok", "created_at"]).groupby(["key", "variant"], sort=True).tail(1)
    return pa.Table.from_pandas(df.drop(columns="_ok").sort_values(["key", "variant"]), schema=CAPTIONS_SCHEMA,
                                preserve_index=False)
