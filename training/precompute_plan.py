"""Precompute's plan of rows, before any pixel is decoded: which samples, which bucket, which shard. Each function
works on the rows of one manifest part (training/precompute_parts.py runs them as Ray tasks) or, for small DATA,
tests and benchmarks, on all of DATA at once:

    sources = caption_sources(data, ["dense", "alt"], model="gpt-4.1")  # {"dense": ("gpt-4.1", "dense@…")}
    rows, skipped = read_candidates(data, ["dense", "alt"], sources)  # kept manifest rows with every variant ok
                                                              # (`dense@15`: dense cut to 15 words, caption_variants)
    rows, skipped = read_candidates(data, variants, sources, part=manifest_parts(data)[0])   # one part's
    rows, errors = locate_images(data, rows)                  # tar offsets (one header scan per download tar)
    rows, changes = assign_buckets(rows, table, min_samples=64, policy="merge")
    rows = assign_shards(rows, shard_size=1000)               # deterministic: same inputs → same shards
    hashes = shard_hashes(rows, variants)                     # shard → fingerprint of its planned content

Sizes come from the manifest (width × height as decoded, EXIF applied); a row without them gets its image header
read. Every shard's content is fixed before encoding, so each output tar can be finished, marked done and skipped
on rerun independently; `shard_hash` fingerprints that content (keys, buckets and caption texts, in order), so a
marker written for other content is not trusted. Inside a bucket rows are ordered by sha1 of the key
(`order_key`): neighbours in the URL list do not share a shard.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from captioning.schema import (ALT_VARIANT, CAPTIONS_SCHEMA, SOURCE_COLUMNS, STATUS_OK, KeyRanges, choose_sources,
                               read_captions, read_captions_range)
from common.decode import displayed_size
from curation.download import tar_index
from curation.manifest import read_manifest
from training.buckets import BucketTable
from training.caption_variants import split_variant, variant_text
from training.shard_format import shard_name

MANIFEST_COLUMNS = ["key", "alt_text", "width", "height", "keep", "shard", "member"]
CAPTION_READ = ["key", "variant", "text", "status", *SOURCE_COLUMNS, "created_at"]


def caption_column(variant: str) -> str:
    return f"caption.{variant}"


def caption_sources(data: str | Path, variants: list[str], model: str | None = None,
                    prompt_ids: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """{base variant: (model, prompt_id)} whose captions precompute reads (`captioning.schema.choose_sources`);
    alt is the manifest's and has none."""
    bases = sorted({split_variant(v)[0] for v in variants} - {ALT_VARIANT})
    return choose_sources(data, bases, model, prompt_ids) if bases else {}


def part_captions(data: str | Path, sources: dict[str, tuple[str, str | None]], keys: tuple[str, str] | None = None,
                  ranges: KeyRanges | None = None) -> pd.DataFrame:
    """`captioning.schema.latest_captions(data, sources)` for the keys lo ≤ key ≤ hi of one manifest part (None:
    every key), read with `read_captions_range` (`ranges`: the caption parts that may hold them): one row per (key,
    variant), the ok row if any attempt succeeded, else the latest attempt. The same rule as latest_captions,
    which reads every caption (it takes no key range)."""
    if not sources:
        return CAPTIONS_SCHEMA.empty_table().select(CAPTION_READ).to_pandas()
    if keys is None:
        df = read_captions(data, CAPTION_READ).to_pandas()
    else:
        df = read_captions_range(data, *keys, CAPTION_READ, ds.field("variant").isin(sorted(sources)),
                                 ranges).to_pandas()
    pick = pd.Series(False, index=df.index)
    for variant, (model, prompt_id) in sources.items():
        pick |= (df["variant"] == variant) & (df["model"] == model) & (df["prompt_id"] == prompt_id)
    df = df[pick].assign(_ok=lambda d: d["status"] == STATUS_OK)
    group = ["key", "variant", *SOURCE_COLUMNS]
    df = df.sort_values([*group, "_ok", "created_at"]).groupby(group, sort=True, dropna=False).tail(1)
    return df.drop(columns="_ok").reset_index(drop=True)


def read_candidates(data: str | Path, variants: list[str], sources: dict[str, tuple[str, str | None]] | None = None,
                    part: Path | None = None, ranges: KeyRanges | None = None) -> tuple[pd.DataFrame, Counter]:
    """Kept manifest rows that have every requested variant ok (alt: a non-null alt text), in key order, with a
    `caption.<variant>` column each; and the skipped keys counted by their first missing variant and why.
    `<base>@<N>` is the base variant's caption cut to its first N words (training/caption_variants.py). `sources`
    (`caption_sources`, computed when None): whose captions; a base variant without one is not captioned. `part`:
    one manifest part only (default: all of DATA), its captions read by key range; `ranges` (captioning.schema.
    key_ranges, or the part of them that meets this part's keys): the caption parts to open."""
    bases = {variant: split_variant(variant)[0] for variant in variants}
    sources = caption_sources(data, variants) if sources is None else sources
    manifest = read_manifest(data, MANIFEST_COLUMNS) if part is None else pq.read_table(part, columns=MANIFEST_COLUMNS)
    manifest = manifest.filter(pc.fill_null(manifest["keep"], False)).sort_by("key").to_pandas()
    manifest = manifest.rename(columns={"shard": "shard_in"})  # `shard` will name the output shard
    captions = None
    if set(bases.values()) - {ALT_VARIANT}:
        keys = (manifest["key"].iat[0], manifest["key"].iat[-1]) if part is not None and len(manifest) else None
        captions = part_captions(data, sources if len(manifest) else {}, keys, ranges)
    ok = pd.Series(True, index=manifest.index)
    skipped: Counter = Counter()
    for variant, base in bases.items():
        if base == ALT_VARIANT:
            text, reason = manifest["alt_text"], pd.Series("no alt text", index=manifest.index)
            missing = text.isna()
        else:
            rows = captions[captions["variant"] == base].set_index("key")
            status = manifest["key"].map(rows["status"])
            text = manifest["key"].map(rows["text"])
            missing = (status != STATUS_OK) | text.isna()
            by = f" by {sources[base][0]} ({sources[base][1]})" if base in sources else ""
            reason = status.fillna("not captioned" + by)
        manifest[caption_column(variant)] = text if variant == base else text.map(lambda t: variant_text(t, variant))
        for why, n in reason[missing & ok].value_counts().items():
            skipped[f"{variant}: {why}"] += int(n)
        ok &= ~missing
    return manifest[ok].reset_index(drop=True), skipped


def header_size(raw: bytes) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation 5-8 swaps the sides), from the header alone."""
    return displayed_size(raw)


def locate_images(data: str | Path, rows: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Add `offset`, `size` (the image bytes inside DATA/download/<shard_in>) and fill missing width/height from
    the header; rows whose bytes cannot be found or read become error rows."""
    download = Path(data) / "download"
    offsets, sizes, errors, keep = [], [], [], []
    members: dict[str, dict] = {}
    widths, heights = rows["width"].to_numpy(dtype=float), rows["height"].to_numpy(dtype=float)
    for i, row in enumerate(rows.itertuples(index=False)):
        error = None
        if not isinstance(row.shard_in, str) or not isinstance(row.member, str):
            error = "manifest row has no image bytes (shard/member null)"
        else:
            if row.shard_in not in members:
                path = download / row.shard_in
                members[row.shard_in] = tar_index(path) if path.is_file() else {}
            if row.member not in members[row.shard_in]:
                error = f"image {row.member} not found in download/{row.shard_in}"
        offset, size = members[row.shard_in][row.member] if error is None else (0, 0)
        if error is None and (np.isnan(widths[i]) or np.isnan(heights[i])):
            try:
                with open(download / row.shard_in, "rb") as f:
                    f.seek(offset)
                    widths[i], heights[i] = header_size(f.read(size))
            except Exception as err:  # a broken header is this image's problem, not the run's
                error = f"unreadable image header: {type(err).__name__}: {err}"
        if error is not None:
            errors.append({"key": row.key, "stage": "plan", "error": error})
        offsets.append(offset)
        sizes.append(size)
        keep.append(error is None)
    rows = rows.assign(offset=offsets, size=sizes, width=widths, height=heights)
    rows = rows[np.array(keep, dtype=bool)].reset_index(drop=True)  # (a list would pick columns when empty)
    return rows.astype({"width": int, "height": int}), errors


# --- buckets ------------------------------------------------------------------------------------------------------


def bucket_rows(rows: pd.DataFrame, table: BucketTable) -> pd.DataFrame:
    """Add `bucket` (WxH), `base`, `ratio`, `upscaled` (training/buckets.py's assignment)."""
    assigned = [table.assign(w, h) for w, h in zip(rows["width"], rows["height"])]
    return rows.assign(bucket=[b.name for b, _ in assigned], base=[b.base for b, _ in assigned],
                       ratio=[b.ratio for b, _ in assigned], upscaled=[up for _, up in assigned])


def small_buckets(counts: dict[str, int], table: BucketTable, min_samples: int = 0,
                  policy: str = "merge") -> list[dict]:
    """From samples per bucket alone: one record per bucket under `min_samples`, {bucket, samples, action, into},
    merged into the nearest ratio at the same base area that has enough samples, or dropped (policy, or no such
    bucket)."""
    changes = []
    for name in sorted((n for n, c in counts.items() if c < min_samples), key=table.by_name):
        src = table.by_name(name)
        big = tuple(b.ratio for b in table.buckets if b.base == src.base and counts.get(b.name, 0) >= min_samples)
        into = None
        if policy == "merge" and big:
            rw, rh = (int(x) for x in src.ratio.split(":"))
            into = table.get(src.base, table.nearest_ratio(rw, rh, among=big))
        changes.append({"bucket": name, "samples": int(counts[name]), "action": "merged" if into else "dropped",
                        "into": into.name if into else None})
    return changes


def apply_changes(rows: pd.DataFrame, changes: list[dict], table: BucketTable) -> pd.DataFrame:
    """Rows of merged buckets moved into their `into` bucket (its name and ratio; the base is the same), rows of
    dropped buckets removed."""
    for change in changes:
        sel = rows["bucket"] == change["bucket"]
        if change["into"]:
            rows.loc[sel, ["bucket", "ratio"]] = change["into"], table.by_name(change["into"]).ratio
        else:
            rows = rows[~sel]
    return rows.reset_index(drop=True)


def assign_buckets(rows: pd.DataFrame, table: BucketTable, min_samples: int = 0,
                   policy: str = "merge") -> tuple[pd.DataFrame, list[dict]]:
    """`bucket_rows`, then `small_buckets` over these rows' counts and `apply_changes`: the rows kept and one
    record per small bucket."""
    rows = bucket_rows(rows, table)
    changes = small_buckets(rows["bucket"].value_counts().to_dict(), table, min_samples, policy)
    return apply_changes(rows, changes, table), changes


# --- shards -------------------------------------------------------------------------------------------------------


def order_key(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def in_shard_order(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by bucket, then sha1 of the key (then the key: the order is total)."""
    rows = rows.assign(_order=rows["key"].map(order_key)).sort_values(["bucket", "_order", "key"], kind="stable")
    return rows.drop(columns="_order").reset_index(drop=True)


def assign_shards(rows: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    """Add `shard` (path relative to the set: `WxH/shard-000000.tar`): each bucket's rows in `in_shard_order`, cut
    into shards of `shard_size` (the last one shorter); sorted by shard and position. What the part-wise plan
    (training/precompute_parts.py) makes of a DATA whose bucket fits in one group."""
    rows = in_shard_order(rows)
    position = rows.groupby("bucket").cumcount().to_numpy()
    rows["shard"] = [f"{b}/{shard_name(p // shard_size)}" for b, p in zip(rows["bucket"], position)]
    return rows


def shard_hash(rows: pd.DataFrame, variants: list[str]) -> str:
    """sha256 (16 hex digits) of one shard's planned content: keys, buckets and caption texts, in order."""
    digest = hashlib.sha256()
    for values in rows[["key", "bucket", *(caption_column(v) for v in variants)]].itertuples(index=False):
        digest.update(repr(tuple(values)).encode())
    return digest.hexdigest()[:16]


def shard_hashes(rows: pd.DataFrame, variants: list[str]) -> dict[str, str]:
    """shard → `shard_hash` of its rows."""
    return {shard: shard_hash(group, variants) for shard, group in rows.groupby("shard", sort=True)}
