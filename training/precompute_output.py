"""Precompute's outputs in the shard set (formats: training/shard_format.py): per-shard completion, the tar writer
an encoder actor uses, and index.parquet / errors.parquet.

    record, why = settle_shard(set_dir, "64x64/shard-000003.tar", plan_hash)  # done? else cleared to be redone
    writer = ShardWriter(set_dir, shard, plan_hash)     # in the encoder actor: .shard-000003.tar.<id>.tmp
    writer.add(key, sample, meta)  /  writer.add(key, error=..., stage="decode")
    record = writer.finish()                            # tar renamed into place (fsynced), then its done marker
    index, errors = write_outputs(set_dir, records, table, plan_errors)

A done marker vouches for its tar only while the plan hash it records is the shard's and the tar has the size it
records; anything else is removed and the shard redone (a marker is never trusted over the data).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path, publish, write_json
from training.buckets import BucketTable
from training.shard_format import ERRORS_FILE, INDEX_FILE, done_marker, read_done, tar_mismatch


def marker_path(set_dir: Path, shard: str) -> Path:
    return done_marker(set_dir / shard)


def shard_done(set_dir: Path, shard: str, plan_hash: str) -> bool:
    """Done with this plan: its marker is for the plan and vouches for the tar (there, with the size recorded)."""
    return settle_record(set_dir, shard, plan_hash)[0] is not None


def settle_record(set_dir: Path, shard: str, plan_hash: str) -> tuple[dict | None, str | None]:
    """(the marker's record, None) when the shard is done with this plan; else (None, why a marker of this plan
    cannot vouch for its tar: missing or cut; None when there is no such marker). Reads only."""
    record = read_done(set_dir / shard)
    if record is None or record.get("plan") != plan_hash:
        return None, None
    why = tar_mismatch(set_dir / shard, record)
    return (None, why) if why else (record, None)


def settle_shard(set_dir: Path, shard: str, plan_hash: str) -> tuple[dict | None, str | None]:
    """`settle_record`; a shard that is not done loses its tar and marker (another plan's, or cut), so that the
    set never holds a tar its marker does not vouch for while it is redone."""
    record, why = settle_record(set_dir, shard, plan_hash)
    if record is None:
        (set_dir / shard).unlink(missing_ok=True)
        marker_path(set_dir, shard).unlink(missing_ok=True)
    return record, why


def clean(set_dir: Path, shards: set[str]) -> None:
    """Remove what a kill left mid-write (`.shard-*.tmp`: tars and markers, common/atomic.py's names) and the
    tars and markers of shards that are not in this plan (a bucket that lost shards, a bucket table's old sizes)."""
    for path in set_dir.glob("*/*shard-*"):
        if path.parent.name.startswith("_"):  # _plan/: precompute_parts.py's
            continue
        shard = f"{path.parent.name}/{path.name.replace('.done.json', '.tar')}"
        if path.suffix == ".tmp" or shard not in shards:
            path.unlink()


class ShardWriter:
    """One shard's tar, written by the encoder actor under a temporary name of its own (a second writer, say an
    actor of a killed run that has not died yet, never writes into the same file); `finish` renames it into place
    and then writes the done marker (with the shard's errors)."""

    def __init__(self, set_dir: Path, shard: str, plan_hash: str):
        import webdataset as wds

        self.set_dir, self.shard, self.plan = Path(set_dir), shard, plan_hash
        final = self.set_dir / shard
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        self.stream = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.stream, encoder=False, mtime=0)  # mtime 0: the same rows, the same bytes
        self.samples, self.errors = 0, []

    def add(self, key: str, sample: bytes = b"", meta: bytes = b"", error: str | None = None,
            stage: str | None = None) -> None:
        if error is None:
            self.tar.write({"__key__": key, "tensors.safetensors": sample, "meta.json": meta})
            self.samples += 1
        else:
            self.errors.append({"key": key, "stage": stage, "error": error})

    def finish(self) -> dict:
        self.tar.close()
        self.stream.close()
        final = publish(self.tmp, self.set_dir / self.shard, fsync=True)  # the tar on disk before its marker
        record = {"shard": self.shard, "plan": self.plan, "samples": self.samples, "bytes": final.stat().st_size,
                  "errors": self.errors}
        write_json(marker_path(self.set_dir, self.shard), record, fsync=True)
        return record

    def abort(self) -> None:
        self.stream.close()
        self.tmp.unlink(missing_ok=True)


def write_outputs(set_dir: Path, records: list[dict], table: BucketTable,
                  plan_errors: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """index.parquet over every planned shard with samples (from their done markers' records) and errors.parquet
    (the plan's errors, then each shard's, in shard order)."""
    index, errors = [], list(plan_errors)
    for record in sorted(records, key=lambda r: r["shard"]):
        bucket = table.by_name(record["shard"].split("/")[0])
        errors += [{**e, "shard": record["shard"]} for e in record["errors"]]
        if record["samples"]:
            index.append({"shard": record["shard"], "bucket": bucket.name, "base": bucket.base, "ratio": bucket.ratio,
                          "samples": record["samples"], "bytes": record["bytes"]})
    index_df = pd.DataFrame(index, columns=["shard", "bucket", "base", "ratio", "samples", "bytes"])
    errors_df = pd.DataFrame(errors, columns=["key", "stage", "error", "shard"]).astype(str).replace("None", None)
    for df, name in ((index_df, INDEX_FILE), (errors_df, ERRORS_FILE)):
        with atomic_path(set_dir / name) as tmp:
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    return index_df, errors_df
