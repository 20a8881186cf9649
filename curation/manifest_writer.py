"""The manifest, written part by part in Ray tasks: one part per input shard, so the driver holds per-part
counts and a sample of rows, never the manifest.

    summary, sample = write_manifest_parts(data, shards, verified, dup_files)   # DATA/manifest/part-<shard>.parquet

A part joins its input shard (key, URL as given, alt text, carried columns, the guard's refusals), its filtered
part (when the download shard finished) and the duplicates of its key range (its list's dup_of file). The parts
are written into a staged folder and swapped in whole (common/atomic.py): a kill leaves the old manifest or the
new one. Each task returns its part's funnel and a sample (its first rows of every group, for the report's
thumbnails in manifest order, and an even sample for the charts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.atomic import recover_folder, staging_dir, swap_folder
from common.progress import progress_bar
from curation.dedup_job import read_dups
from curation.funnel import funnel, merge_funnels
from curation.input_shards import shard_path
from curation.manifest import MANIFEST_COLUMNS, MANIFEST_SCHEMA, STATUS_FAILED_DOWNLOAD, manifest_dir
from curation.shard_filter import FILTERED_SCHEMA

REPORT_SAMPLE_ROWS = 200_000  # rows the report's charts are drawn from, spread over the parts
FIRST_PER_GROUP = 16  # rows per group (kept, each reason) each part sends for the report's thumbnails
_OWN = ("lf_key", "uri", "refused")  # the input shard's columns of our own


def build_manifest(inputs: pd.DataFrame, refused: dict[str, str], filtered: pd.DataFrame,
                   dups: dict[str, str], extra_cols: list[str]) -> pd.DataFrame:
    """One row per input URL, in key order, rejected rows included."""
    base = inputs[["key", "url", "alt_text", *extra_cols]]
    results = filtered.drop(columns=["exact_hash", "phash", "thumb", "embedding"], errors="ignore").set_index("key")
    m = base.join(results, on="key")
    unsafe = m["key"].map(refused)
    m.loc[unsafe.notna(), ["status", "error", "reject_reason"]] = STATUS_FAILED_DOWNLOAD, None, "unsafe_url"
    m.loc[unsafe.notna(), "error"] = unsafe[unsafe.notna()]
    missing = m["status"].isna()  # safe rows whose shard never finished: say so rather than drop them
    m.loc[missing, ["status", "error", "reject_reason"]] = (
        STATUS_FAILED_DOWNLOAD, "download shard did not finish; rerun to retry", "failed_download")
    m["dup_of"] = m["key"].map(dups)
    m.loc[m["dup_of"].notna() & m["reject_reason"].isna(), "reject_reason"] = "duplicate"
    m["keep"] = m["reject_reason"].isna()
    return m[[*MANIFEST_COLUMNS, *extra_cols]]


def build_part(data: Path, shard: str, filtered: bool, dup_file: str | None) -> pa.Table:
    """The manifest part of one input shard, in MANIFEST_SCHEMA plus the list's carried columns."""
    inputs = pq.read_table(shard_path(data, shard))
    carried = [c for c in inputs.column_names if c not in (*_OWN, "url", "alt_text")]
    keys = inputs["lf_key"].to_pylist()
    refused = {k: r for k, r in zip(keys, inputs["refused"].to_pylist()) if r}
    frame = inputs.select(["lf_key", "url", "alt_text"]).rename_columns(["key", "url", "alt_text"]).to_pandas()
    part = data / "filtered" / f"{shard}.parquet"
    names = [c for c in FILTERED_SCHEMA.names if c != "embedding"]
    rows = pq.read_table(part, columns=names) if filtered else FILTERED_SCHEMA.empty_table().select(names)
    dups = read_dups(Path(dup_file), keys[0], keys[-1]) if dup_file and keys else {}
    manifest = build_manifest(frame, refused, rows.to_pandas(), dups, [])
    table = pa.Table.from_pandas(manifest, schema=MANIFEST_SCHEMA, preserve_index=False)
    for col in carried:  # in input order, as the input shard types them (the same in every shard of a list)
        table = table.append_column(inputs.schema.field(col), inputs[col])
    return table


def _sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    """The first FIRST_PER_GROUP rows of every group (kept, each reason) and an even sample of n rows."""
    keep = pc.fill_null(table["keep"], False).to_numpy(zero_copy_only=False)
    reason = np.asarray(table["reject_reason"].to_pylist(), dtype=object)
    group = np.where(keep, "kept", reason.astype(str))
    picked = set()
    for g in np.unique(group):
        picked |= set(np.flatnonzero(group == g)[:FIRST_PER_GROUP].tolist())
    rng = np.random.default_rng(seed)
    picked |= set(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False).tolist())
    return table.take(pa.array(sorted(picked), pa.int64()))


def write_part(data: str, shard: str, staged: str, filtered: bool, dup_file: str | None, sample_rows: int) -> dict:
    """Ray task: build and write one part; returns its funnel and report sample."""
    table = build_part(Path(data), shard, filtered, dup_file)
    pq.write_table(table, Path(staged) / f"part-{shard}.parquet")
    sample = _sample(table.select(list(MANIFEST_COLUMNS)), sample_rows, int(shard) if shard.isdigit() else 0)
    return {"funnel": funnel(table), "sample": sample}


def write_manifest_parts(data: str | Path, shards: list[str], filtered: set[str],
                         dup_file_of: dict[str, Path]) -> tuple[dict, pa.Table]:
    """Every part of the manifest, staged and swapped in whole; returns (the funnel, the report's sample)."""
    import ray

    data = Path(data)
    recover_folder(manifest_dir(data))
    staged = staging_dir(manifest_dir(data))
    task = ray.remote(num_cpus=1)(write_part)
    per_part = max(100, REPORT_SAMPLE_ROWS // max(1, len(shards)))
    refs = {task.remote(str(data), s, str(staged), s in filtered,
                        str(dup_file_of[s]) if s in dup_file_of else None, per_part): i for i, s in enumerate(shards)}
    results: dict[int, dict] = {}
    with progress_bar(total=len(refs), desc="manifest", unit="part") as bar:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                results[refs.pop(ref)] = ray.get(ref)
                bar.update(1)
    swap_folder(staged, manifest_dir(data))
    ordered = [results[i] for i in range(len(shards))]
    sample = pa.concat_tables([r["sample"] for r in ordered])
    return merge_funnels([r["funnel"] for r in ordered]), sample


def write_manifest(manifest: pd.DataFrame, data: str | Path, part_rows: int = 1_000_000) -> pa.Table:
    """A manifest held in memory (tests, fixtures, small tools) → DATA/manifest/part-*.parquet, swapped in whole,
    in MANIFEST_SCHEMA plus any carried columns (types as pandas infers them)."""
    schema = MANIFEST_SCHEMA
    for col in manifest.columns[len(MANIFEST_COLUMNS):]:
        schema = schema.append(pa.Schema.from_pandas(manifest[[col]], preserve_index=False).field(col))
    table = pa.Table.from_pandas(manifest, schema=schema, preserve_index=False)
    recover_folder(manifest_dir(data))
    staged = staging_dir(manifest_dir(data))
    for i, start in enumerate(range(0, max(len(table), 1), part_rows)):
        pq.write_table(table.slice(start, part_rows), staged / f"part-{i:05d}.parquet")
    swap_folder(staged, manifest_dir(data))
    return table
