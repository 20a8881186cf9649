"""The distributed dedup (curation/dedup_job.py, dedup_shuffle.py): its map and reduce steps, run here in-process,
find what the in-memory `find_duplicates` finds; a later list is deduplicated against what earlier ones kept."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import DedupConfig
from curation.dedup import clip_edges, find_duplicates
from curation.dedup_job import map_shard, reduce_partition, resolve, fit_centroids
from curation.dedup_shuffle import clip_pairs, clip_signatures
from curation.manifest import make_key
from curation.markers import marker_path, write_marker
from curation.shard_filter import FILTERED_SCHEMA

SHARD = 200


def planted_rows(n: int, seed: int, sources: dict | None = None) -> dict:
    """n candidate rows: random hashes, with exact copies, pHash copies 2 bits off (same thumbnail), pHash near
    misses whose thumbnails differ (vetoed), identical pHashes with other thumbnails, and rejected rows. `sources`
    (another set's columns) are copied from instead of this set's own rows when given."""
    rng = np.random.default_rng(seed)
    exact = np.array([f"{x:040x}" for x in rng.integers(0, 2**62, n)], dtype=object)
    phash = rng.integers(-2**62, 2**62, n, dtype=np.int64)
    thumbs = rng.integers(0, 256, (n, 192), dtype=np.uint8)
    src = sources or {"exact": exact, "phash": phash, "thumbs": thumbs}
    pick = rng.integers(0, len(src["exact"]) // 2, n)
    kind = rng.random(n)
    e = kind < 0.05
    exact[e] = src["exact"][pick[e]]
    near = (kind >= 0.05) & (kind < 0.10)
    phash[near], thumbs[near] = src["phash"][pick[near]] ^ 0b11, src["thumbs"][pick[near]]
    veto = (kind >= 0.10) & (kind < 0.13)
    phash[veto] = src["phash"][pick[veto]] ^ 0b1
    same = (kind >= 0.13) & (kind < 0.15)
    phash[same] = src["phash"][pick[same]]
    rejected = (kind >= 0.15) & (kind < 0.25)
    return {"exact": exact, "phash": phash, "thumbs": thumbs, "rejected": rejected,
            "rank": rng.random(n).astype(np.float32)}


def write_filtered(data, rows: dict, first_key: int) -> list[str]:
    """DATA/filtered/<shard>.parquet parts of SHARD rows (FILTERED_SCHEMA) and their markers."""
    folder, shards = data / "filtered", []
    n = len(rows["exact"])
    for start in range(0, n, SHARD):
        sl = slice(start, min(n, start + SHARD))
        shard = f"{(first_key + start) // SHARD:05d}"
        m = sl.stop - sl.start
        cols = {name: [None] * m for name in FILTERED_SCHEMA.names}
        cols |= {"key": [make_key(first_key + i) for i in range(sl.start, sl.stop)], "status": ["ok"] * m,
                 "exact_hash": list(rows["exact"][sl]), "phash": rows["phash"][sl],
                 "thumb": [t.tobytes() for t in rows["thumbs"][sl]], "aesthetic": rows["rank"][sl],
                 "reject_reason": ["blur" if r else None for r in rows["rejected"][sl]]}
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=FILTERED_SCHEMA), folder / f"{shard}.parquet")
        write_marker(marker_path(folder, shard), {"config_hash": "c", "download_stamp": shard}, folder,
                     [f"{shard}.parquet"])
        shards.append(shard)
    return shards


def dedup_in_process(data, cfg: DedupConfig, shards: list[str], old: list[str] = (), old_dups=None,
                     parts: int = 4) -> dict:
    """What run_dedup's tasks do, one after another in this process."""
    records = [map_shard(str(data), s, cfg, parts, "hash") for s in [*old, *shards]]
    tables = [pq.read_table(reduce_partition(str(data), str(data / f"pairs-{p}.parquet"), shards, list(old), p,
                                             cfg)) for p in range(parts)]
    for p in range(parts):
        (data / f"pairs-{p}.parquet").unlink()
    rank = "aesthetic" if any(r["has_aesthetic"] for r in records) else None
    return resolve(pa.concat_tables(tables), cfg.keep, rank, old_dups or {})


def in_memory(rows: dict, first_key: int, cfg: DedupConfig) -> dict:
    cand = np.flatnonzero(~rows["rejected"])
    keys = [make_key(first_key + i) for i in cand]
    return find_duplicates(keys, list(rows["exact"][cand]), rows["phash"][cand], None, rows["rank"][cand], cfg,
                           thumbs=rows["thumbs"][cand].reshape(-1, 8, 8, 3))


@pytest.mark.parametrize("keep", ["first", "best"])
@pytest.mark.parametrize("max_distance", [0, 4])
def test_the_shuffle_finds_what_the_in_memory_search_finds(tmp_path, keep, max_distance):
    cfg = DedupConfig(clip=False, keep=keep, phash_max_distance=max_distance)
    rows = planted_rows(1000, seed=1)
    shards = write_filtered(tmp_path, rows, 0)
    expected = in_memory(rows, 0, cfg)
    assert len(expected) > 40  # the planted copies are found
    assert dedup_in_process(tmp_path, cfg, shards) == expected
    assert dedup_in_process(tmp_path, cfg, shards, parts=1) == expected  # the partition count changes nothing


def test_a_later_list_is_deduplicated_against_what_the_earlier_ones_kept(tmp_path):
    cfg = DedupConfig(clip=False)
    first = planted_rows(600, seed=2)
    old = write_filtered(tmp_path, first, 0)
    old_dups = dedup_in_process(tmp_path, cfg, old)
    second = planted_rows(400, seed=3, sources=first)  # copies of the first list's rows
    new = write_filtered(tmp_path, second, 600)
    dups = dedup_in_process(tmp_path, cfg, new, old=old, old_dups=old_dups)

    assert not set(dups) & set(old_dups) and all(int(k) >= 600 for k in dups)  # old verdicts stand
    kept_old = {make_key(i) for i in np.flatnonzero(~first["rejected"])} - set(old_dups)
    to_old = {k: v for k, v in dups.items() if int(v) < 600}
    assert len(to_old) > 20 and set(to_old.values()) <= kept_old  # copies point at kept rows, never at a dup
    # the same answer as deduplicating both lists at once, for the new rows, whenever the old verdicts agree
    both = {k: v for k, v in in_memory({c: np.concatenate([first[c], second[c]]) for c in first}, 0, cfg).items()
            if int(k) >= 600}
    assert set(both) == set(dups)
    # map files of the first list were reused, not rewritten (their markers say the same filtered parts)
    assert (tmp_path / "dedup" / "map" / "_done" / "00000.hash.json").is_file()


def test_clip_clusters_find_the_planted_pairs_the_exact_search_finds():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 16)).astype(np.float32)
    x = np.concatenate([base, base[:40] + 0.01 * rng.normal(size=(40, 16)).astype(np.float32)])
    cands = pa.table({"key": [make_key(i) for i in range(len(x))], "embedding": pa.array(list(x)),
                      "aesthetic": pa.nulls(len(x), pa.float32()), "clip_score": pa.nulls(len(x), pa.float32())})
    centroids = fit_centroids([x[rng.choice(len(x), 1000, replace=False)]], len(x), cluster_size=1000)
    assert centroids.shape == (4, 16)
    rows = clip_signatures(cands, centroids, parts=2)
    found = set()
    for p in range(2):
        part = rows.filter(pa.compute.equal(rows["part"], p)).sort_by("key")
        pairs = clip_pairs(part, 0.985)
        keys = part["key"].to_numpy(zero_copy_only=False).astype(int)
        found |= {tuple(sorted(k)) for k in keys[pairs].tolist()}
    exact = {tuple(sorted(p)) for p in clip_edges(x, 0.985, cluster_size=10_000).tolist()}
    planted = {(i, 3000 + i) for i in range(40)}
    assert planted <= exact
    assert len(found & planted) >= 38 and found <= exact  # a cluster boundary may split a pair (the trade-off)
