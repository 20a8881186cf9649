"""Manifests of several parts, as `lensforge curate` writes them at scale (one part per input shard, each a
contiguous key range in key order), for the caption tests: `curation.pipeline.write_manifest` writes one part."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.manifest import MANIFEST_SCHEMA, manifest_dir


def write_parted_manifest(rows: list[dict], data: Path, rows_per_part: int) -> list[Path]:
    """DATA/manifest/part-00000.parquet, part-00001.parquet, ...: `rows` (MANIFEST_SCHEMA fields, missing ones
    null) sorted by key, `rows_per_part` rows each; replaces any manifest there. Returns the parts."""
    folder = manifest_dir(data)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=MANIFEST_SCHEMA)
    parts = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_part)):
        parts.append(folder / f"part-{i:05d}.parquet")
        pq.write_table(table.slice(start, rows_per_part), parts[-1])
    return parts
