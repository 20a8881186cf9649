"""Dedup as a hash-partitioned shuffle: the map side (one filtered shard → signature files) and the reduce side
(one partition of every shard's signatures → candidate pairs), pure functions that curation/dedup_job.py runs
as Ray tasks. Together they find the pairs `dedup.find_duplicates` finds, without one process holding every row.

Signatures of one dedup candidate (a row every other filter kept), each routed to partition `part` of P:
  exact  its exact hash (identical decoded pixels): equal hashes meet in one partition;
  phash  one row per band of its 64-bit pHash, split into d + 1 bands (d = phash_max_distance): by pigeonhole
         two hashes within Hamming distance d agree on a whole band, so they meet in the partition of that
         (band, value); the pair is checked there (distance, then the 8×8 thumbnails, carried in the row);
  clip   its CLIP embedding, routed by its nearest k-means centroid (centroids fitted on a sample; SemDeDup):
         pairs above the cosine threshold are searched exactly inside each cluster.
A map file holds one row group per partition, so a reduce task reads its partition's row groups alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path
from curation.dedup import _equal_value_edges, _pairs_above, _same_value_pairs, confirm_pairs, phash_array

RANKS = ("aesthetic", "clip_score")  # carried with every signature: keep="best" ranks pair members by them
KINDS = ("exact", "phash", "clip")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values over partitions


def band_widths(max_distance: int) -> list[int]:
    bands = max_distance + 1
    return [64 // bands + (b < 64 % bands) for b in range(bands)]


def _partition_of(values: np.ndarray, salt: int, parts: int) -> np.ndarray:
    """(n,) uint64 → (n,) int32 partition in [0, parts), the same for the same (value, salt) in every task."""
    with np.errstate(over="ignore"):
        mixed = (values.astype(np.uint64) + np.uint64(salt)) * _MIX
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int32)


def _write_by_part(table: pa.Table, path: Path) -> None:
    """`table` sorted by `part`, one row group per partition (reduce tasks read theirs by statistics)."""
    table = table.sort_by([("part", "ascending"), ("key", "ascending")])
    parts = table["part"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1], True]) if len(parts) else np.array([0, 0])
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, table.schema) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # an empty table: one empty row group
            writer.write_table(table.slice(lo, hi - lo))


def exact_signatures(cands: pa.Table, parts: int) -> pa.Table:
    """cands: key, exact_hash, ranks → part, key, hash, ranks (rows without a hash are left out)."""
    cands = cands.filter(cands["exact_hash"].is_valid())
    hashes = cands["exact_hash"].to_pylist()
    head = np.array([int(h[:16], 16) if h else 0 for h in hashes], np.uint64)  # sha1 hex: its first 64 bits
    return pa.table({"part": _partition_of(head, 0, parts), "key": cands["key"], "hash": cands["exact_hash"],
                     **{r: cands[r] for r in RANKS}})


def phash_signatures(cands: pa.Table, max_distance: int, parts: int) -> pa.Table:
    """cands: key, phash, thumb, ranks → one row per (row, band): part, band, value, key, phash, thumb, ranks."""
    cands = cands.filter(cands["phash"].is_valid())
    h = phash_array(cands["phash"].to_pylist()).view(np.uint64)  # (n,) the 64 bits
    tables, shift = [], 0
    for band, width in enumerate(band_widths(max_distance)):
        value = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1 if width < 64 else 2**64 - 1)
        shift += width
        tables.append(pa.table({
            "part": _partition_of(value, band + 1, parts), "band": pa.array(np.full(len(h), band, np.int8)),
            "value": pa.array(value), "key": cands["key"], "phash": cands["phash"], "thumb": cands["thumb"],
            **{r: cands[r] for r in RANKS}}))
    return pa.concat_tables(tables) if tables else pa.table({})


def clip_signatures(cands: pa.Table, centroids: np.ndarray, parts: int) -> pa.Table:
    """cands: key, embedding, ranks → part, cluster, key, embedding (unit rows), ranks; cluster = nearest of
    centroids (k, D)."""
    cands = cands.filter(cands["embedding"].is_valid())
    x = embedding_rows(cands["embedding"], centroids.shape[1])
    cluster = (x @ centroids.T).argmax(axis=1).astype(np.int64)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return pa.table({"part": _partition_of(cluster.astype(np.uint64), 0, parts), "cluster": cluster,
                     "key": cands["key"], "embedding": emb, **{r: cands[r] for r in RANKS}})


def embedding_rows(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A list<float> column without nulls → (n, dim) float32 unit rows."""
    x = np.array(column.to_pylist(), np.float32)
    return unit_rows(x.reshape(len(x), dim) if len(x) else np.empty((0, dim), np.float32))


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def write_signatures(table: pa.Table, path: Path) -> None:
    _write_by_part(table, path)


def read_partition(paths: list[Path], part: int) -> pa.Table | None:
    """The rows of partition `part` in every map file of one kind (row groups pruned by statistics), or None."""
    tables = [pq.read_table(p, filters=[("part", "=", part)]) for p in paths]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables).sort_by("key") if tables else None


# --- the reduce side: one partition → pairs (row indices into the partition's table, i < j not required) -------


def exact_pairs(rows: pa.Table) -> np.ndarray:
    """(E, 2) star edges joining equal hashes (rows sorted by key: each run joins its smallest key)."""
    return _equal_value_edges(np.asarray(rows["hash"].to_pylist(), dtype=object))


def phash_pairs(rows: pa.Table, max_distance: int, max_diff: int) -> np.ndarray:
    """(E, 2) pairs of one partition's band rows: identical pHashes joined (band 0 only: they share every band),
    then distinct pHashes that share a band value and lie within max_distance, all confirmed on thumbnails —
    `dedup.phash_edges` + `confirm_pairs`, restricted to the rows of this partition."""
    found = [np.empty((0, 2), np.int64)]
    band_col, value_col = rows["band"].to_numpy(), rows["value"].to_numpy()
    h_all = phash_array(rows["phash"].to_pylist()).view(np.uint64)
    thumbs = np.stack([np.frombuffer(t, np.uint8) for t in rows["thumb"].to_pylist()]) if len(rows) else None
    for band in np.unique(band_col):
        idx = np.flatnonzero(band_col == band)  # in key order (rows are sorted by key)
        h = h_all[idx]
        uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)  # first = smallest key
        if band == 0:
            found.append(np.stack([idx, idx[first[inverse]]], axis=1))
        values = value_col[idx[first]]
        for a, b in _same_value_pairs(values):
            close = np.bitwise_count(uniq[a] ^ uniq[b]) <= max_distance
            found.append(np.stack([idx[first[a[close]]], idx[first[b[close]]]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return confirm_pairs(pairs, thumbs, max_diff) if len(pairs) else pairs


def clip_pairs(rows: pa.Table, threshold: float) -> np.ndarray:
    """(E, 2) pairs with cosine > threshold inside each cluster of the partition (exact search per cluster)."""
    cluster = rows["cluster"].to_numpy()
    emb = np.asarray(rows["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(len(rows), -1)
    found = [np.empty((0, 2), np.int64)]
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        a, b = _pairs_above(emb[members], threshold)
        found.append(np.stack([members[a], members[b]], axis=1))
    return np.concatenate(found)


def pair_table(rows: pa.Table, pairs: np.ndarray) -> pa.Table:
    """Index pairs → key pairs with both members' ranks: a, b, a_<rank>, b_<rank>."""
    a, b = pa.array(pairs[:, 0]), pa.array(pairs[:, 1])
    out = {"a": rows["key"].take(a), "b": rows["key"].take(b)}
    for r in RANKS:
        out[f"a_{r}"], out[f"b_{r}"] = rows[r].take(a), rows[r].take(b)
    return pa.table(out)
