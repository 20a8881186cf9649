"""Precompute's first pass, on the driver and before any pixel is decoded: which samples, which bucket, which shard.

    sources = caption_sources(data, ["dense", "alt"], model="gpt-4.1")  # {"dense": ("gpt-4.1", "dense@…")}
    rows, skipped = read_candidates(data, ["dense", "alt"], sources)  # kept manifest rows with every variant ok
                                                              # (`dense@15`: dense cut to 15 words, caption_variants)
    rows, errors = locate_images(data, rows)                  # tar offsets (one header scan per download tar)
    rows, changes = assign_buckets(rows, table, min_samples=64, policy="merge")
    rows = assign_shards(rows, shard_size=1000)               # deterministic: same inputs → same shards

Sizes come from the manifest (width × height as decoded, EXIF applied); a row without them gets its image header
read. Every shard's content is fixed here, before encoding, so each output tar can be finished, marked done and
skipped on rerun independently; `shard_hashes` fingerprints that content (keys and caption texts), so a marker
written for other content is not trusted.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from captioning.schema import ALT_VARIANT, STATUS_OK, choose_sources, latest_captions
from common.decode import displayed_size
from curation.download import tar_index
from curation.manifest import read_manifest
from training.buckets import BucketTable
from training.caption_variants import split_variant, variant_text
from training.shard_format import shard_name

MANIFEST_COLUMNS = ["key", "alt_text", "width", "height", "keep", "shard", "member"]


def caption_column(variant: str) -> str:
    return f"caption.{variant}"


def caption_sources(data: str | Path, variants: list[str], model: str | None = None,
                    prompt_ids: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """{base variant: (model, prompt_id)} whose captions precompute reads (`captioning.schema.choose_sources`);
    alt is the manifest's and has none."""
    bases = sorted({split_variant(v)[0] for v in variants} - {ALT_VARIANT})
    return choose_sources(data, bases, model, prompt_ids) if bases else {}


def read_candidates(data: str | Path, variants: list[str],
                    sources: dict[str, tuple[str, str | None]] | None = None) -> tuple[pd.DataFrame, Counter]:
    """Kept manifest rows that have every requested variant ok (alt: a non-null alt text), in key order, with a
    `caption.<variant>` column each; and the skipped keys counted by their first missing variant and why.
    `<base>@<N>` is the base variant's caption cut to its first N words (training/caption_variants.py). `sources`
    (`caption_sources`, computed when None): whose captions; a base variant without one is not captioned."""
    bases = {variant: split_variant(variant)[0] for variant in variants}
    sources = caption_sources(data, variants) if sources is None else sources
    manifest = read_manifest(data, columns=MANIFEST_COLUMNS)
    manifest = manifest.filter(pc.fill_null(manifest["keep"], False)).sort_by("key").to_pandas()
    manifest = manifest.rename(columns={"shard": "shard_in"})  # `shard` will name the output shard
    captions = latest_captions(data, sources).to_pandas() if set(bases.values()) - {ALT_VARIANT} else None
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
    rows = rows[keep].reset_index(drop=True)
    return rows.astype({"width": int, "height": int}), errors


def assign_buckets(rows: pd.DataFrame, table: BucketTable, min_samples: int = 0,
                   policy: str = "merge") -> tuple[pd.DataFrame, list[dict]]:
    """Add `bucket` (WxH), `base`, `ratio`, `upscaled`; then buckets under `min_samples` are merged into the
    nearest ratio at the same base area that has enough samples, or dropped (policy, or no such bucket). Returns
    the rows kept and one record per small bucket: {bucket, samples, action, into}."""
    assigned = [table.assign(w, h) for w, h in zip(rows["width"], rows["height"])]
    rows = rows.assign(bucket=[b.name for b, _ in assigned], base=[b.base for b, _ in assigned],
                       ratio=[b.ratio for b, _ in assigned], upscaled=[up for _, up in assigned])
    counts = rows["bucket"].value_counts()
    small = [name for name, n in counts.items() if n < min_samples]
    changes = []
    for name in sorted(small, key=lambda n: table.by_name(n)):
        src = table.by_name(name)
        big = tuple(b.ratio for b in table.buckets if b.base == src.base and counts.get(b.name, 0) >= min_samples)
        into = None
        if policy == "merge" and big:
            rw, rh = (int(x) for x in src.ratio.split(":"))
            into = table.get(src.base, table.nearest_ratio(rw, rh, among=big))
        sel = rows["bucket"] == name
        changes.append({"bucket": name, "samples": int(sel.sum()), "action": "merged" if into else "dropped",
                        "into": into.name if into else None})
        if into:
            rows.loc[sel, ["bucket", "ratio"]] = into.name, into.ratio
        else:
            rows = rows[~sel]
    return rows.reset_index(drop=True), changes


def _order_key(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def assign_shards(rows: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    """Add `shard` (path relative to the set: `WxH/shard-000000.tar`), in a fixed pseudo-random order per bucket
    (sha1 of the key: neighbours in the URL list do not share a shard), sorted by shard and position."""
    rows = rows.assign(_order=rows["key"].map(_order_key)).sort_values(["bucket", "_order"], kind="stable")
    position = rows.groupby("bucket").cumcount().to_numpy()
    rows["shard"] = [f"{b}/{shard_name(p // shard_size)}" for b, p in zip(rows["bucket"], position)]
    return rows.drop(columns="_order").reset_index(drop=True)


def shard_hashes(rows: pd.DataFrame, variants: list[str]) -> dict[str, str]:
    """shard → sha256 of its planned content (keys, buckets and caption texts, in order)."""
    out = {}
    cols = ["key", "bucket", *(caption_column(v) for v in variants)]
    for shard, group in rows.groupby("shard", sort=True):
        digest = hashlib.sha256()
        for values in group[cols].itertuples(index=False):
            digest.update(repr(tuple(values)).encode())
        out[shard] = digest.hexdigest()[:16]
    return out


def bucket_counts(rows: pd.DataFrame) -> Counter:
    return Counter(rows["bucket"])
