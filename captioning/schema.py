"""The captions table: DATA/captions/part-*.parquet, long format, one row per (key, variant).

This module owns the schema (ARCHITECTURE.md, "Captions"); precompute and training import it from here.
A key already `ok` for a variant is never requested again.
"""

from __future__ import annotations

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
