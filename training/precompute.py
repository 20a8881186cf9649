"""`lensforge precompute`: kept, captioned images → aspect-bucketed training shards (training/shard_format.py).

    lensforge precompute --data data --codec pixel --text-encoder minilm --variants dense,alt

Steps (kill at any moment and rerun the same command: only unfinished shards are redone):
  1. the cache key from the configs alone (training/cache_key.py: identities from the models' config files,
     weights fingerprints; nothing loaded) → encoders.json and the shard set id;
  2. candidates: kept manifest rows with every requested caption variant ok (the rest counted as skipped);
  3. probe, one Ray task on an encoder's resources: loads both models, checks they agree with the key, counts the
     tokens of a caption sample;
  4. plan on the driver, from sizes alone: bucket per image, small buckets merged or dropped, a fixed shard per
     key; the storage estimate is printed and checked against `disk_budget_gb` and the free disk;
  5. Ray Data over the unfinished shards: decode + resize/crop tasks (CPU) → encoder actors (a GPU each where
     the cluster has GPUs) → the driver streams the samples into `shard-N.tar.tmp`, renames it when the shard is
     complete and then writes its done marker;
  6. index.parquet, errors.parquet, DATA/reports/buckets.html and DATA/reports/precompute.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from common.atomic import atomic_path, publish, write_json, write_text
from common.ray_runtime import init_ray
from training.bucket_report import format_buckets, write_bucket_report
from training.buckets import BucketTable
from training.cache_key import encoders_record, loaded_mismatches, table_for
from training.precompute_config import PrecomputeConfig
from training.precompute_plan import (
    assign_buckets,
    assign_shards,
    caption_column,
    caption_sources,
    locate_images,
    read_candidates,
    shard_hashes,
)
from training.precompute_workers import Encoder, decode_batch, probe_encoders
from training.shard_format import (
    ERRORS_FILE,
    INDEX_FILE,
    done_marker,
    read_done,
    shard_set_id,
    tar_mismatch,
    write_encoders,
)

PADDED_TOKENS = 512  # the padded layout the estimate compares against (GPT-OSS's 512-token limit)
TAR_OVERHEAD = 3 * 512 + 3 * 256 + 512  # per sample: 3 member headers, average padding, safetensors header


def shards_dir(data: str | Path) -> Path:
    return Path(data) / "shards"


def estimate_storage(rows: pd.DataFrame, table: BucketTable, probe: dict, cfg: PrecomputeConfig) -> dict:
    """Bytes per sample (latent per bucket, mean tokens per variant × feature width × dtype) and in total, and
    the same sample with every caption padded to 512 tokens in float32."""
    c, f, dim = probe["channels"], probe["factor"], probe["feature_dim"]
    cells = {b.name: c * (b.width // f) * (b.height // f) for b in table.buckets}
    mean_cells = float(rows["bucket"].map(cells).mean()) if len(rows) else 0.0
    latent = mean_cells * (2 if cfg.latent_dtype == "bfloat16" else 4)
    per_token = {"bfloat16": 2 * dim, "float8_e4m3fn": dim + 4}[cfg.text_dtype]
    tokens = {v: (sum(ls) / len(ls) if ls else 0.0) for v, ls in probe["lengths"].items()}
    text = sum(tokens.values()) * per_token
    captions = sum(rows[caption_column(v)].str.len().mean() for v in cfg.variants) if len(rows) else 0.0
    overhead = TAR_OVERHEAD + 300 + float(captions)  # + meta.json
    per_sample = latent + text + overhead
    padded_text = len(cfg.variants) * PADDED_TOKENS * dim * 4
    return {"samples": len(rows), "per_sample": per_sample, "total": per_sample * len(rows), "latent": latent,
            "text": text, "mean_tokens": tokens, "padded_fp32_per_sample": mean_cells * 4 + padded_text + overhead,
            "padded_fp32_text": padded_text, "feature_dim": dim}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def format_estimate(est: dict) -> str:
    tokens = ", ".join(f"{v} {n:.0f}" for v, n in est["mean_tokens"].items())
    ratio = est["per_sample"] / est["padded_fp32_per_sample"] if est["padded_fp32_per_sample"] else 0
    return (f"precompute: estimated {_size(est['per_sample'])}/sample (latent {_size(est['latent'])}, text "
            f"{_size(est['text'])}; mean tokens {tokens}; {est['feature_dim']} values/token), "
            f"{_size(est['total'])} for {est['samples']:,} samples; padded to {PADDED_TOKENS} tokens in fp32: "
            f"{_size(est['padded_fp32_per_sample'])}/sample ({ratio:.3f}× of it stored)")


def check_budget(est: dict, cfg: PrecomputeConfig, remaining_bytes: float, out: Path) -> None:
    if cfg.disk_budget_gb is not None and est["total"] > cfg.disk_budget_gb * 1e9:
        raise ValueError(
            f"precompute: estimated {_size(est['total'])} is above disk_budget_gb {cfg.disk_budget_gb:g}; "
            "raise the budget or store fp8 (text_dtype: float8_e4m3fn)")
    free = shutil.disk_usage(out).free
    if remaining_bytes > free:
        raise ValueError(f"precompute: {_size(remaining_bytes)} left to write but only {_size(free)} free at {out}")


# --- per-shard completion -----------------------------------------------------------------------------------------


def marker_path(set_dir: Path, shard: str) -> Path:
    return done_marker(set_dir / shard)


def shard_done(set_dir: Path, shard: str, plan_hash: str) -> bool:
    """Done with this plan: its marker is for the plan and vouches for the tar (there, with the size recorded)."""
    record = read_done(set_dir / shard)
    return record is not None and record.get("plan") == plan_hash and tar_mismatch(set_dir / shard, record) is None


def _clean(set_dir: Path, hashes: dict[str, str]) -> None:
    """Remove temporary files, and tars/markers that are not in this plan or are not done with it; a marker of
    this plan whose tar is gone or cut is said, in one line, before its shard is redone."""
    for shard, plan_hash in hashes.items():
        record = read_done(set_dir / shard)
        if record is not None and record.get("plan") == plan_hash and (why := tar_mismatch(set_dir / shard, record)):
            print(f"precompute: {why}: redoing {shard}")
    for path in set_dir.glob("*/.shard-*.tmp"):  # a marker a kill caught mid-write (common/atomic.py's names)
        path.unlink()
    for path in set_dir.glob("*/shard-*"):
        shard = f"{path.parent.name}/{path.name.replace('.done.json', '.tar').removesuffix('.tmp')}"
        if path.suffix == ".tmp" or shard not in hashes or not shard_done(set_dir, shard, hashes[shard]):
            path.unlink()


class ShardWriter:
    """Streams encoded rows into per-shard tars (`.tmp`); a shard whose planned rows have all arrived is renamed
    into place and then marked done (the marker also lists its errors)."""

    def __init__(self, set_dir: Path, expected: dict[str, int], hashes: dict[str, str]):
        self.set_dir, self.expected, self.hashes = set_dir, expected, hashes
        self.open: dict[str, dict] = {}
        self.finished = 0

    def add(self, row) -> None:
        import webdataset as wds

        state = self.open.get(row.shard)
        if state is None:
            tmp = self.set_dir / f"{row.shard}.tmp"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            stream = open(tmp, "wb")
            state = self.open[row.shard] = {"tmp": tmp, "stream": stream, "seen": 0, "samples": 0, "errors": [],
                                            "tar": wds.TarWriter(stream, encoder=False, mtime=0)}
        if not isinstance(row.error, str):  # None arrives as None or NA, depending on the batch
            state["tar"].write({"__key__": row.key, "tensors.safetensors": row.sample, "meta.json": row.meta})
            state["samples"] += 1
        else:
            state["errors"].append({"key": row.key, "stage": row.stage, "error": row.error})
        state["seen"] += 1
        if state["seen"] == self.expected[row.shard]:
            self._finish(row.shard, self.open.pop(row.shard))

    def _finish(self, shard: str, state: dict) -> None:
        state["tar"].close()
        state["stream"].close()
        final = self.set_dir / shard
        publish(state["tmp"], final, fsync=True)  # the tar on disk before the marker that vouches for it
        record = {"shard": shard, "plan": self.hashes[shard], "samples": state["samples"],
                  "bytes": final.stat().st_size, "errors": state["errors"]}
        write_json(marker_path(self.set_dir, shard), record, fsync=True)
        self.finished += 1


def encode_shards(rows: pd.DataFrame, cfg: PrecomputeConfig, table: BucketTable, data: Path, set_dir: Path,
                  hashes: dict) -> dict:
    """Ray Data over the plan rows of unfinished shards; returns timings of the stream."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows leave in plan order: one shard open at a time, same tars
    ctx.enable_progress_bars = False
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    chunk = cfg.decode_batch_size * 4
    ds = ray.data.from_pandas([rows.iloc[i:i + chunk] for i in range(0, len(rows), chunk)])
    # A decode task's memory: its source images and resized copies. Also keeps it apart from the encoder actors
    # (Ray Data fuses ops with equal resource args): fused, decoding would run inside the actor, in series.
    decode_memory = max(512 * 2**20, cfg.decode_batch_size * max(b.width * b.height for b in table.buckets) * 12)
    ds = ds.map_batches(decode_batch, batch_size=cfg.decode_batch_size, batch_format="pandas", num_cpus=1,
                        memory=decode_memory,
                        fn_kwargs={"data": str(data), "max_pixels": cfg.max_pixels, "variants": cfg.variants})
    ds = ds.map_batches(Encoder, batch_size=cfg.batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=cfg.encoder_actors), num_gpus=gpus,
                        num_cpus=cfg.cpus_per_actor, fn_constructor_kwargs={"cfg": cfg})
    writer = ShardWriter(set_dir, rows.groupby("shard").size().to_dict(), hashes)
    started, first = time.perf_counter(), None
    n_first = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        if first is None:
            first, n_first = time.perf_counter(), len(batch)
        for row in batch.itertuples(index=False):
            writer.add(row)
    ended = time.perf_counter()
    if writer.open:
        raise RuntimeError(f"precompute: shards left incomplete: {sorted(writer.open)}")
    steady = (len(rows) - n_first) / (ended - first) if first and ended > first else None
    return {"encode_s": round(ended - started, 3), "first_output_s": round((first or ended) - started, 3),
            "steady_samples_per_s": steady, "encoded": len(rows), "gpus_per_actor": gpus}


# --- outputs ------------------------------------------------------------------------------------------------------


def write_outputs(set_dir: Path, hashes: dict, table: BucketTable, plan_errors: list[dict]) -> tuple[pd.DataFrame,
                                                                                                      pd.DataFrame]:
    """index.parquet over every planned shard (from the markers) and errors.parquet (plan + shard errors)."""
    index, errors = [], list(plan_errors)
    for shard in sorted(hashes):
        marker = json.loads(marker_path(set_dir, shard).read_text())
        bucket = table.by_name(shard.split("/")[0])
        errors += [{**e, "shard": shard} for e in marker["errors"]]
        if marker["samples"]:
            index.append({"shard": shard, "bucket": bucket.name, "base": bucket.base, "ratio": bucket.ratio,
                          "samples": marker["samples"], "bytes": marker["bytes"]})
    index_df = pd.DataFrame(index, columns=["shard", "bucket", "base", "ratio", "samples", "bytes"])
    errors_df = pd.DataFrame(errors, columns=["key", "stage", "error", "shard"]).astype(str).replace("None", None)
    for df, name in ((index_df, INDEX_FILE), (errors_df, ERRORS_FILE)):
        with atomic_path(set_dir / name) as tmp:
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    return index_df, errors_df


def _probe(cfg: PrecomputeConfig, rows: pd.DataFrame) -> dict:
    """probe_encoders on an encoder's resources (a GPU when the cluster has one); its own errors, unwrapped."""
    import ray

    sample = rows.sample(min(cfg.estimate_sample, len(rows)), random_state=0) if len(rows) else rows
    texts = {v: sample[caption_column(v)].tolist() for v in cfg.variants}
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else int(ray.cluster_resources().get("GPU", 0) >= 1)
    task = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=gpus)(probe_encoders)
    try:
        return ray.get(task.remote(cfg, texts))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, Exception):
            raise err.cause from None
        raise


def precompute(data: str | Path, cfg: PrecomputeConfig, ray_address: str | None = None) -> Path:
    """Run (or finish) the shard set of `cfg` under DATA/shards/; returns its directory."""
    data = Path(data)
    timings: dict = {}
    started = time.perf_counter()
    table = table_for(cfg)
    sources = caption_sources(data, cfg.variants, cfg.caption_model, cfg.caption_prompts)
    record = encoders_record(cfg, table, sources)  # a wrong spec or path fails here, in one line, before Ray starts
    rows, skipped = read_candidates(data, cfg.variants, sources)
    by = "".join(f"; {v} by {m} ({p})" for v, (m, p) in sources.items())
    print(f"precompute: {len(rows):,} kept images with every variant of {cfg.variants}{by}; "
          f"{sum(skipped.values()):,} skipped" + (f" ({dict(skipped)})" if skipped else ""))
    if rows.empty:
        raise ValueError(f"precompute: nothing to encode: no kept image of {data} has every variant of "
                         f"{cfg.variants} ({dict(skipped) or 'no kept images'}); run `lensforge caption` first")
    init_ray(ray_address)
    probe = _probe(cfg, rows)
    timings["probe_s"] = round(time.perf_counter() - started, 3)
    if problems := loaded_mismatches(record, probe):
        raise ValueError("precompute: the loaded encoders disagree with the cache key made from their config "
                         f"files: {'; '.join(problems)}")

    set_dir = shards_dir(data) / shard_set_id(record)
    rows, plan_errors = locate_images(data, rows)
    rows, changes = assign_buckets(rows, table, cfg.min_bucket_samples, cfg.small_buckets)
    rows = assign_shards(rows, cfg.shard_size)
    hashes = shard_hashes(rows, cfg.variants)
    est = estimate_storage(rows, table, probe, cfg)
    print(format_estimate(est))
    set_dir.mkdir(parents=True, exist_ok=True)
    _clean(set_dir, hashes)
    done = {s for s, h in hashes.items() if shard_done(set_dir, s, h)}  # one marker read per shard, not per row
    todo = rows[~rows["shard"].isin(done)]
    check_budget(est, cfg, est["per_sample"] * len(todo), set_dir)
    write_encoders(set_dir, record)
    write_text(set_dir / "config.precompute.yaml",
               yaml.safe_dump({"precompute": json.loads(cfg.model_dump_json())}, sort_keys=False))
    print(f"precompute: shard set {set_dir} — {len(hashes)} shards, {len(done)} "
          f"already done, {len(todo):,} images to encode")
    if len(todo):
        timings.update(encode_shards(todo, cfg, table, data, set_dir, hashes))

    index, errors = write_outputs(set_dir, hashes, table, plan_errors)
    print(format_buckets(index, changes))
    report = write_bucket_report(data / "reports" / "buckets.html", set_dir, index, changes, skipped, errors, est)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    summary = {"set_id": set_dir.name, "samples": int(index["samples"].sum()), "errors": len(errors),
               "skipped": dict(skipped), "small_buckets": changes, "estimate": est, "seconds": timings}
    write_json(data / "reports" / "precompute.json", summary, default=float)
    print(f"precompute: {summary['samples']:,} samples in {len(index)} shards, {len(errors)} errors "
          f"({set_dir / ERRORS_FILE}); report at {report}")
    return set_dir
