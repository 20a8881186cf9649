"""The manifest: one row per input URL, rejected rows included, so the funnel can be audited.

This module owns the manifest's schema (ARCHITECTURE.md, "Manifest"); captioning and training import it from here.
Files: DATA/manifest/part-*.parquet.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import recover_folder
from curation import filters

# `status`: what happened to the bytes (img2dataset's success / failed_to_download / failed_to_resize).
STATUS_OK = "ok"
STATUS_FAILED_DOWNLOAD = "failed_download"
STATUS_FAILED_DECODE = "failed_decode"
STATUSES = (STATUS_OK, STATUS_FAILED_DOWNLOAD, STATUS_FAILED_DECODE)

# `reject_reason`: the first check of curation/filters.py's chain that rejected the row (null when kept); one float
# column per scored filter, null when that filter did not run for the row. Both in the chain's order.
REJECT_REASONS, SCORE_COLUMNS = filters.REJECT_REASONS, filters.SCORE_COLUMNS

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # zero-padded input row index: stable across reruns
        pa.field("url", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),  # downloader / decoder / guard message; null when ok
        pa.field("width", pa.int32()),  # of the downloaded image, as decoded
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the downloaded bytes
        *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
        pa.field("dup_of", pa.string()),  # key of the copy that was kept, or null
        pa.field("keep", pa.bool_()),
        pa.field("reject_reason", pa.string()),
        pa.field("shard", pa.string()),  # tar path relative to DATA/download/, or null
        pa.field("member", pa.string()),  # member name of the image inside that tar
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)

KEY_DIGITS = 10


def make_key(row_index: int) -> str:
    """The key of the input URL list's row `row_index` (0-based, over all input files in sorted order)."""
    return f"{row_index:0{KEY_DIGITS}d}"


def manifest_dir(data: str | Path) -> Path:
    return Path(data) / "manifest"


def manifest_parts(data: str | Path) -> list[Path]:
    """The manifest's parts in key order: `part-<shard>.parquet`, one per input shard (`download.shard_size`
    consecutive keys; curation/input_shards.py), each in key order. Stages that scale read one part per task; a
    clear error when there is no manifest."""
    recover_folder(manifest_dir(data))  # a curate killed mid-swap: its complete new manifest, or the old one
    parts = sorted(manifest_dir(data).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no manifest under {manifest_dir(data)}: run `lensforge curate` first")
    return parts


def read_manifest(data: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every manifest row of DATA, in key order (small DATA, tests, reports; stages that scale use
    `manifest_parts`)."""
    # parts of URL lists added later may carry other input columns: the union, null where a list has none
    return pa.concat_tables((pq.read_table(p, columns=columns) for p in manifest_parts(data)),
                            promote_options="permissive")
