"""Global dedup of a curate run as Ray tasks: the driver holds lists of shards and the candidate pairs, never
the rows (the shuffle itself is curation/dedup_shuffle.py).

    dup_files = run_dedup(data, cfg.dedup, generations)   # [[shards of list 0], [shards of list 1], ...]
                                                          # → one DATA/dedup/gen-<i>/<fp>/dup_of.parquet per list

1. map, one task per filtered shard: its candidates' signatures, partitioned (DATA/dedup/map/<shard>.<kind>
   .parquet + a marker naming the filtered part and settings it was made from: a rerun maps only what changed);
   with CLIP embeddings, k-means centroids are first fitted on a sample drawn by one task per shard (SemDeDup);
2. reduce, one task per partition: candidate pairs (DATA/dedup/gen-<i>/<fp>/pairs-<part>.parquet);
3. on the driver: pairs → connected components → the kept copy of each group → dup_of, written once per list.

Generations make it incremental: list i (a URL list added later with `curate --add`) is deduplicated against
itself and against what lists 0 … i−1 kept, reading their signature files, not their filtered parts; their rows
keep their verdicts (a new row that copies a kept one points at it). A generation's fingerprint covers its
shards' filtered parts, the settings and the generations before it: a rerun reuses a finished generation with
the same fingerprint, and redoes it (and every later one) when anything under it changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path, write_json
from common.progress import progress_bar
from curation.config import DedupConfig
from curation.dedup import _kept_copy
from curation.dedup_shuffle import (RANKS, clip_pairs, clip_signatures, exact_pairs, exact_signatures, pair_table,
                                    embedding_rows, phash_pairs, phash_signatures, read_partition, unit_rows,
                                    write_signatures)
from curation.markers import marker_path, read_marker, stale_reason, write_marker

SAMPLE_ROWS = 100_000  # embeddings the k-means centroids are fitted on, drawn evenly over the shards
MIN_PARTS, SHARDS_PER_PART, MAX_PARTS = 1, 4, 4096
DUP_COLUMNS = ("key", "dup_of")
_CANDIDATE_COLUMNS = ["key", "reject_reason", "exact_hash", "phash", "thumb", *RANKS]


def dedup_dir(data: str | Path) -> Path:
    return Path(data) / "dedup"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def filtered_identity(data: Path, shard: str) -> dict | None:
    """What the filtered part of `shard` is (its marker: config, download stamp, size); None if not filtered."""
    record = read_marker(marker_path(data / "filtered", shard))
    return None if record is None else {k: record.get(k) for k in ("config_hash", "download_stamp", "files")}


def _candidates(data: Path, shard: str, columns: list[str]) -> pa.Table:
    table = pq.read_table(data / "filtered" / f"{shard}.parquet", columns=columns)
    return table.filter(table["reject_reason"].is_null())


# --- map ------------------------------------------------------------------------------------------------------


def map_shard(data: str, shard: str, dcfg: DedupConfig, parts: int, kind: str,
              centroids: np.ndarray | None = None) -> dict:
    """kind "hash": exact + pHash signatures; "clip": CLIP signatures (needs centroids). Skipped when its marker
    names the same filtered part and settings. Returns the marker: candidates, embeddings, has_<rank>."""
    data, folder = Path(data), dedup_dir(data) / "map"
    ident = {"filtered": filtered_identity(data, shard), "parts": parts, "kind": kind}
    if kind == "hash":
        ident |= {"exact": dcfg.exact, "phash": dcfg.phash, "d": dcfg.phash_max_distance}
    else:
        ident["centroids"] = _digest(np.round(centroids, 6).tolist())
    marker = marker_path(folder, f"{shard}.{kind}")
    record = read_marker(marker)
    if record is not None and record.get("ident") == ident and stale_reason(record, folder) is None:
        return record
    cols = _CANDIDATE_COLUMNS if kind == "hash" else ["key", "reject_reason", "embedding", *RANKS]
    cands = _candidates(data, shard, cols)
    names, summary = [], {"candidates": cands.num_rows}
    summary |= {f"has_{r}": cands[r].null_count < cands.num_rows for r in RANKS}
    if kind == "hash":
        for name, on, make in (("exact", dcfg.exact, lambda: exact_signatures(cands, parts)),
                               ("phash", dcfg.phash, lambda: phash_signatures(cands, dcfg.phash_max_distance, parts))):
            if on:
                write_signatures(make(), folder / f"{shard}.{name}.parquet")
                names.append(f"{shard}.{name}.parquet")
    else:
        write_signatures(clip_signatures(cands, centroids, parts), folder / f"{shard}.clip.parquet")
        names.append(f"{shard}.clip.parquet")
    return write_marker(marker, {"ident": ident, **summary}, folder, names)


def sample_embeddings(data: str, shard: str, n: int) -> tuple[int, np.ndarray]:
    """(how many candidates of the shard have an embedding, a seeded sample of up to n of them as unit rows)."""
    cands = _candidates(Path(data), shard, ["reject_reason", "embedding"])
    cands = cands.filter(cands["embedding"].is_valid())
    if cands.num_rows == 0:
        return 0, np.empty((0, 0), np.float32)
    rng = np.random.default_rng(int(shard) if shard.isdigit() else 0)
    take = np.sort(rng.choice(cands.num_rows, size=min(n, cands.num_rows), replace=False))
    picked = cands["embedding"].take(pa.array(take, pa.int64()))
    return cands.num_rows, embedding_rows(picked, len(picked[0]))


def fit_centroids(samples: list[np.ndarray], total: int, cluster_size: int, seed: int = 0) -> np.ndarray:
    """(k, D) unit centroids, k = ceil(total / cluster_size); one centroid (every row in one cluster, searched
    exactly) up to cluster_size embeddings."""
    x = np.concatenate([s for s in samples if len(s)])
    k = max(1, math.ceil(total / cluster_size))
    if k == 1 or len(x) <= k:
        return unit_rows(x.mean(axis=0, keepdims=True) if k == 1 else x)
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(x)
    return unit_rows(km.cluster_centers_)


# --- reduce ---------------------------------------------------------------------------------------------------


def _kind_paths(data: Path, shards: list[str], kind: str) -> list[Path]:
    folder = dedup_dir(data) / "map"
    return [p for p in (folder / f"{s}.{kind}.parquet" for s in shards) if p.is_file()]


def reduce_partition(data: str, out: str, new: list[str], old: list[str], part: int, dcfg: DedupConfig) -> str:
    """The candidate pairs of one partition among this generation's shards (`new`) and the earlier ones' (`old`),
    except pairs of two old rows (decided before); written to `out` (skipped when there)."""
    data, out = Path(data), Path(out)
    if out.is_file():
        return str(out)
    tables = []
    kinds = [k for k, on in (("exact", dcfg.exact), ("phash", dcfg.phash), ("clip", dcfg.clip)) if on]
    for kind in kinds:
        sides = [(read_partition(_kind_paths(data, shards, kind), part), is_old)
                 for shards, is_old in ((new, False), (old, True))]
        sides = [t.append_column("old", pa.array(np.full(t.num_rows, is_old))) for t, is_old in sides if t]
        if not sides:
            continue
        rows = pa.concat_tables(sides).sort_by("key")
        if kind == "exact":
            pairs = exact_pairs(rows)
        elif kind == "phash":
            pairs = phash_pairs(rows, dcfg.phash_max_distance, dcfg.phash_verify_max_diff)
        else:
            pairs = clip_pairs(rows, dcfg.clip_threshold)
        old_rows = rows["old"].to_numpy()
        pairs = pairs[~(old_rows[pairs[:, 0]] & old_rows[pairs[:, 1]])] if len(pairs) else pairs
        table = pair_table(rows, pairs.reshape(-1, 2))
        tables.append(table.append_column("a_old", rows["old"].take(pa.array(pairs.reshape(-1, 2)[:, 0])))
                      .append_column("b_old", rows["old"].take(pa.array(pairs.reshape(-1, 2)[:, 1]))))
    result = pa.concat_tables(tables) if tables else None
    with atomic_path(out) as tmp:
        pq.write_table(result if result is not None else _empty_pairs(), tmp)
    return str(out)


def _empty_pairs() -> pa.Table:
    fields = [("a", pa.string()), ("b", pa.string())]
    fields += [(f"{s}_{r}", pa.float32()) for r in RANKS for s in ("a", "b")]
    return pa.schema([*fields, ("a_old", pa.bool_()), ("b_old", pa.bool_())]).empty_table()


# --- the driver: pairs → groups → dup_of ----------------------------------------------------------------------


def resolve(pairs: pa.Table, keep: str, rank_col: str | None, old_dups: dict[str, str]) -> dict[str, str]:
    """{duplicate key: kept key} over the new rows of the pairs. An old duplicate in a pair stands for its kept
    copy; a group holding old (kept) rows keeps one of them and the old rows keep their verdicts."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if pairs.num_rows == 0:
        return {}
    df = pairs.to_pandas()
    for side in ("a", "b"):  # an old row that was itself a duplicate: its kept copy takes its place
        df[side] = df[side].map(lambda k: old_dups.get(k, k))
    ends = [df[["a", "a_old", *(f"a_{r}" for r in RANKS)]].set_axis(["key", "old", *RANKS], axis=1),
            df[["b", "b_old", *(f"b_{r}" for r in RANKS)]].set_axis(["key", "old", *RANKS], axis=1)]
    nodes = pd.concat(ends).drop_duplicates("key").sort_values("key").reset_index(drop=True)
    index = pd.Series(np.arange(len(nodes)), index=nodes["key"])
    a, b = index[df["a"]].to_numpy(), index[df["b"]].to_numpy()
    n = len(nodes)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    rank = nodes[rank_col].to_numpy(np.float64) if keep == "best" and rank_col else None
    kept = _kept_copy(nodes["key"].to_numpy(), labels, rank, keep, prefer=nodes["old"].to_numpy(bool))
    keys, is_old = nodes["key"].to_numpy(), nodes["old"].to_numpy(bool)
    return {keys[i]: keys[kept[i]] for i in np.flatnonzero((kept != np.arange(n)) & ~is_old)}


def _rank_col(records: list[dict]) -> str | None:
    """Today's rule, over every candidate: aesthetic when any has one, else the CLIP score, else none."""
    for r in RANKS:
        if any(rec.get(f"has_{r}") for rec in records):
            return r
    return None


def read_dups(path: Path, lo: str | None = None, hi: str | None = None) -> dict[str, str]:
    """key → dup_of of one generation's file, optionally for keys lo ≤ key ≤ hi only."""
    filters = [("key", ">=", lo), ("key", "<=", hi)] if lo is not None else None
    table = pq.read_table(path, filters=filters)
    return dict(zip(table["key"].to_pylist(), table["dup_of"].to_pylist()))


def _write_dups(dups: dict[str, str], path: Path) -> None:
    keys = sorted(dups)
    table = pa.table({"key": pa.array(keys, pa.string()), "dup_of": pa.array([dups[k] for k in keys], pa.string())})
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp, row_group_size=65_536)  # sorted by key: readers of a key range prune by stats


def _parts_for(data: Path, n_shards: int) -> int:
    """Partitions, fixed by the first run of a DATA (later lists are shuffled into the same ones)."""
    path = dedup_dir(data) / "_parts.json"
    if path.is_file():
        return json.loads(path.read_text())["parts"]
    parts = min(MAX_PARTS, max(MIN_PARTS, n_shards // SHARDS_PER_PART))
    write_json(path, {"parts": parts}, fsync=True)
    return parts


def _remote(fn, **options):
    import ray

    return ray.remote(num_cpus=1, **options)(fn)


def _run(tasks, desc: str) -> list:
    """Ray refs → results in order, with a progress bar."""
    import ray

    out, pending = {}, {ref: i for i, ref in enumerate(tasks)}
    with progress_bar(total=len(pending), desc=desc, unit="task") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                out[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
    return [out[i] for i in range(len(out))]


def _centroids(data: Path, dcfg: DedupConfig, shards: list[str], fp: str) -> np.ndarray | None:
    """The CLIP centroids of the first generation (fingerprint fp), fitted once and kept for later lists."""
    path = dedup_dir(data) / f"centroids-{fp}.npy"
    if path.is_file():
        return np.load(path)
    per_shard = max(256, SAMPLE_ROWS // max(1, len(shards)))
    drawn = _run([_remote(sample_embeddings).remote(str(data), s, per_shard) for s in shards], "dedup sample")
    total = sum(n for n, _ in drawn)
    if total == 0:
        return None
    centroids = fit_centroids([x for _, x in drawn], total, dcfg.cluster_size)
    for old in dedup_dir(data).glob("centroids-*.npy"):
        old.unlink()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, centroids)
    return centroids


def run_dedup(data: str | Path, dcfg: DedupConfig, generations: list[list[str]], embeddings: bool) -> list[Path]:
    """Deduplicate every generation in order; returns each one's dup_of file. `embeddings`: the filter step
    made CLIP embeddings (a model filter is configured). Ray must be running."""
    data = Path(data)
    parts = _parts_for(data, sum(map(len, generations)))
    settings = dcfg.model_dump() | {"parts": parts}
    out, prev_fp, old, centroids = [], None, [], None
    for gen, shards in enumerate(generations):
        fp = _digest({"settings": settings, "prev": prev_fp,
                      "shards": {s: filtered_identity(data, s) for s in shards}})
        gen_dir = dedup_dir(data) / f"gen-{gen}" / fp
        for stale in (dedup_dir(data) / f"gen-{gen}").glob("*"):
            if stale.name != fp:
                shutil.rmtree(stale, ignore_errors=True)
        if gen == 0 and dcfg.clip and embeddings:
            centroids = _centroids(data, dcfg, shards, fp)
        if not (gen_dir / "_done.json").is_file():
            _dedup_generation(data, dcfg, parts, shards, old, centroids, gen_dir, out)
        out.append(gen_dir / "dup_of.parquet")
        old, prev_fp = old + shards, fp
    return out


def _dedup_generation(data: Path, dcfg: DedupConfig, parts: int, shards: list[str], old: list[str],
                      centroids: np.ndarray | None, gen_dir: Path, earlier: list[Path]) -> None:
    gen_dir.mkdir(parents=True, exist_ok=True)
    mapper = _remote(map_shard)
    tasks = [mapper.remote(str(data), s, dcfg, parts, "hash") for s in shards]
    if centroids is not None:
        tasks += [mapper.remote(str(data), s, dcfg, parts, "clip", centroids) for s in shards]
    records = _run(tasks, "dedup map")
    clip = dcfg.model_copy(update={"clip": dcfg.clip and centroids is not None})
    reducer = _remote(reduce_partition)
    paths = _run([reducer.remote(str(data), str(gen_dir / f"pairs-{p:05d}.parquet"), shards, old, p, clip)
                  for p in range(parts)], "dedup reduce")
    pairs = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="permissive")
    old_dups: dict[str, str] = {}
    for path in earlier:  # the earlier generations' duplicates: O(duplicates), not O(rows)
        old_dups |= read_dups(path)
    dups = resolve(pairs, dcfg.keep, _rank_col(records), old_dups)
    _write_dups(dups, gen_dir / "dup_of.parquet")
    write_json(gen_dir / "_done.json", {"shards": len(shards), "pairs": pairs.num_rows, "duplicates": len(dups)},
               fsync=True)
