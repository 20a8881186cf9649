"""`lensforge curate`: a URL list in, an audited, filtered, deduplicated manifest out.

    lensforge curate --urls scenes/urls.parquet --out data --allow-hosts 127.0.0.1

Steps, each resumable (kill at any moment, rerun the same command, only what is left is done):
  1. read the URL list, key every row by its position (stable across reruns);
  2. URL guard, statically, on the driver, over each URL's URI form (`iri_to_uri`) → refused rows never reach the
     downloader;
  3. img2dataset on Ray → DATA/download/ (finished shards whose files are whole are not downloaded again);
  4. one Ray actor pool filters shards → DATA/filtered/ (done shards with the same filter config and download are
     skipped);
  5. dedup over the rows every other filter kept;
  6. the manifest (DATA/manifest/part-*.parquet), the funnel (printed + JSON) and DATA/reports/curation.html. A run
     that keeps nothing raises `NothingKeptError` after writing them, naming the check and the setting to change.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import recover_folder, staging_dir, swap_folder, write_json
from common.progress import progress_bar
from common.ray_runtime import init_ray
from curation.config import CurateConfig
from curation.dedup import find_duplicates
from curation.download import KEY_COLUMN, download, download_stamp, ray_runtime_env, url_policy, write_download_input
from curation.funnel import format_funnel, funnel, funnel_hint, write_funnel_json
from curation.inputs import read_url_list
from curation.manifest import MANIFEST_COLUMNS, MANIFEST_SCHEMA, STATUS_FAILED_DOWNLOAD, manifest_dir
from curation.report import write_report
from curation.safety import UrlGuard, iri_to_uri
from curation.shard_filter import FILTERED_SCHEMA, ShardFilter, filter_config_hash, shard_done

MANIFEST_PART_ROWS = 1_000_000


class NothingKeptError(ValueError):
    """A curate run kept no image (the manifest and reports are written): a user-fixable error, exit status 2."""


class Timings(dict):
    """Wall seconds per stage of this run (DATA/reports/timings.json; bench/curate.py reads it)."""

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        yield
        self[stage] = round(time.perf_counter() - started, 3)

    def write(self, path: Path, **extra) -> None:
        write_json(path, {"seconds": dict(self), **extra})


def filter_shards(data: Path, cfg: CurateConfig, shards: list[str]) -> list[dict]:
    """Filter every downloaded shard not yet filtered with this config and download, on a pool of Ray actors."""
    import ray
    from ray.util import ActorPool

    cfg_hash = filter_config_hash(cfg)
    todo = [s for s in shards if not shard_done(data / "filtered", s, cfg_hash, download_stamp(data / "download", s))]
    if not todo:
        return []
    cpus = int(ray.available_resources().get("CPU", 1)) or 1
    n_actors = min(len(todo), cfg.models.actors if cfg.models.clip_model else cpus)
    actor_cls = ray.remote(num_cpus=1)(ShardFilter)
    pool = ActorPool([actor_cls.remote(str(data), cfg) for _ in range(n_actors)])
    stats = []
    for result in progress_bar(pool.map_unordered(lambda a, s: a.__call__.remote(s), todo), total=len(todo),
                       desc="filter", unit="shard"):
        stats.append(result)
    return stats


def read_filtered(data: Path, columns: list[str] | None = None, shards: list[str] | None = None) -> pd.DataFrame:
    """The filtered rows of `shards` (default: every part there is)."""
    parts = sorted((data / "filtered").glob("*.parquet"))
    if shards is not None:  # a part of a shard that is being downloaded again is not this run's
        wanted = set(shards)
        parts = [p for p in parts if p.stem in wanted]
    if not parts:
        return FILTERED_SCHEMA.empty_table().select(columns or FILTERED_SCHEMA.names).to_pandas()
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts).to_pandas()


def _embedding_batches(data: Path, index: dict[str, int]):
    """() -> iterator of (global index (m,), embeddings (m, D)) of the dedup candidates, one filtered shard at a
    time: the embeddings are never all in memory unless they fit (see clip_pairs)."""
    def batches():
        for part in sorted((data / "filtered").glob("*.parquet")):
            table = pq.read_table(part, columns=["key", "embedding"]).to_pandas()
            table = table[table["key"].isin(index) & table["embedding"].notna()]
            if len(table):
                yield table["key"].map(index).to_numpy(np.int64), np.stack(table["embedding"].to_numpy())
    return batches


def clip_pairs(data: Path, keys: list[str], cfg: CurateConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(embeddings (N, D), None) when they fit in dedup.memory_mb, else (None, pairs (E, 2)) from the spilled
    search; (None, None) when there are no embeddings (no CLIP configured)."""
    from curation.dedup_spill import clip_edges_spilled

    index = {k: i for i, k in enumerate(keys)}
    batches = _embedding_batches(data, index)
    first = next(iter(batches()), None)
    if not cfg.dedup.clip or first is None:
        return None, None
    if len(keys) * first[1].shape[1] * 4 <= cfg.dedup.memory_mb * 2**20:
        embeddings = np.zeros((len(keys), first[1].shape[1]), np.float32)
        for idx, emb in batches():
            embeddings[idx] = emb
        return embeddings, None
    return None, clip_edges_spilled(batches, len(keys), cfg.dedup.clip_threshold, cfg.dedup.cluster_size,
                                    data / "dedup" / "partitions")


def dedup(data: Path, filtered: pd.DataFrame, cfg: CurateConfig) -> dict[str, str]:
    """duplicate key → kept key, over the rows that every other filter kept."""
    cands = filtered[filtered["reject_reason"].isna()].sort_values("key")
    if len(cands) < 2:
        return {}
    keys = cands["key"].tolist()
    rank_col = "aesthetic" if cands["aesthetic"].notna().any() else "clip_score"
    rank = cands[rank_col].to_numpy(dtype=np.float64) if cands[rank_col].notna().any() else None
    with progress_bar(total=1, desc="dedup", unit="pass") as bar:
        embeddings, pairs = clip_pairs(data, keys, cfg)
        dups = find_duplicates(
            keys=keys,
            exact=cands["exact_hash"].tolist(),
            phash=cands["phash"].to_numpy(dtype=np.int64),
            embeddings=embeddings,
            rank=rank,
            cfg=cfg.dedup,
            thumbs=np.stack([np.frombuffer(t, np.uint8) for t in cands["thumb"]]),
            clip_pairs=pairs,
        )
        bar.update(1)
    return dups


def build_manifest(inputs: pd.DataFrame, refused: dict[str, str], filtered: pd.DataFrame,
                   dups: dict[str, str], extra_cols: list[str]) -> pd.DataFrame:
    """One row per input URL, in key order, rejected rows included."""
    base = inputs[["key", "url", "alt_text", *extra_cols]]
    results = filtered.drop(columns=["exact_hash", "phash", "thumb"]).set_index("key")
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


def write_manifest(manifest: pd.DataFrame, data: Path) -> pa.Table:
    """DATA/manifest/part-*.parquet in MANIFEST_SCHEMA (+ the carried input columns); returns the table."""
    schema = MANIFEST_SCHEMA
    for col in manifest.columns[len(MANIFEST_COLUMNS):]:  # carried input columns keep their inferred types
        schema = schema.append(pa.Schema.from_pandas(manifest[[col]], preserve_index=False).field(col))
    table = pa.Table.from_pandas(manifest, schema=schema, preserve_index=False)
    # the new parts are written beside the old manifest and swapped in whole: a kill leaves the old or the new
    recover_folder(manifest_dir(data))
    staged = staging_dir(manifest_dir(data))
    for i, start in enumerate(range(0, max(len(table), 1), MANIFEST_PART_ROWS)):
        pq.write_table(table.slice(start, MANIFEST_PART_ROWS), staged / f"part-{i:05d}.parquet")
    swap_folder(staged, manifest_dir(data))
    return table


def curate(urls: str | Path, data: str | Path, cfg: CurateConfig, ray_address: str | None = None) -> pd.DataFrame:
    data = Path(data)
    inputs, extra_cols = read_url_list(urls, cfg.url_col, cfg.caption_col)
    uris = inputs["url"].map(iri_to_uri)  # what is vetted and fetched; the manifest keeps each URL as given
    guard = UrlGuard(url_policy(cfg))
    refused = {k: r for k, r in zip(inputs["key"], map(guard.static_reason, uris)) if r}
    safe = inputs.assign(url=uris)[~inputs["key"].isin(refused)]
    print(f"curate: {len(inputs)} URLs, {len(refused)} refused by the URL guard, {len(safe)} to download")

    timings = Timings()
    with timings("ray_init"):
        init_ray(ray_address, ray_runtime_env(cfg))
    shards: list[str] = []  # the download shards whose files are whole
    if len(safe):
        table = pa.Table.from_pandas(
            safe.rename(columns={"alt_text": "caption", "key": KEY_COLUMN})[["url", "caption", KEY_COLUMN]],
            preserve_index=False)
        input_file = write_download_input(table, data / "download" / "_input" / "urls.parquet")
        with timings("download"):
            shards = download(input_file, data / "download", len(safe), cfg)
        with timings("filter"):
            filter_shards(data, cfg, shards)

    filtered = read_filtered(data, [c for c in FILTERED_SCHEMA.names if c != "embedding"], shards)
    with timings("dedup"):
        dups = dedup(data, filtered, cfg)
    manifest = build_manifest(inputs, refused, filtered, dups, extra_cols)
    table = write_manifest(manifest, data)
    timings.write(data / "reports" / "timings.json", rows=len(inputs), downloaded=len(safe))
    summary = funnel(manifest)
    print(format_funnel(summary))
    write_funnel_json(summary, data / "reports" / "funnel.json")
    report = write_report(data, table, cfg)
    print(f"curate: manifest in {manifest_dir(data)}, report at {report}")
    hint = funnel_hint(summary, cfg)
    if summary["kept"] == 0:
        raise NothingKeptError(hint)
    if hint:
        print(hint)
    return manifest

