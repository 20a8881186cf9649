"""`lensforge precompute`: kept, captioned images → aspect-bucketed training shards (training/shard_format.py).

    lensforge precompute --data data --codec pixel --text-encoder minilm --variants dense,alt

Steps (kill at any moment and rerun the same command: only unfinished shards are redone):
  1. the cache key from the configs alone (training/cache_key.py: identities from the models' config files,
     weights fingerprints; nothing loaded) → encoders.json and the shard set id;
  2. the plan, Ray tasks over the manifest's parts (training/precompute_parts.py): candidates (kept rows with
     every requested caption variant ok; the rest counted as skipped), a bucket per image from sizes alone, small
     buckets merged or dropped, every shard's rows and hash; shards whose done marker is for that hash are done;
  3. probe, one Ray task on an encoder's resources: loads both models, checks they agree with the key, counts the
     tokens of a caption sample; the storage estimate is printed and checked against `disk_budget_gb` and the
     free disk;
  4. encoder actors (a GPU each where the cluster has GPUs), one shard per call: decode + resize/crop tasks (CPU)
     beside the actor, then the actor encodes, writes `.shard-N.tar.<id>.tmp`, renames it and writes its done
     marker (training/precompute_output.py); the driver holds one small record per shard, never a sample;
  5. index.parquet and errors.parquet from the shards' records and the plan's error files, DATA/reports/
     buckets.html and DATA/reports/precompute.json (with the shards each node encoded).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, deque
from pathlib import Path

import yaml

from common.atomic import write_json, write_text
from common.progress import progress_bar
from common.ray_runtime import init_ray, node_order
from training.bucket_report import format_buckets, write_bucket_report
from training.buckets import BucketTable
from training.cache_key import encoders_record, loaded_mismatches, table_for
from training.precompute_config import PrecomputeConfig
from training.precompute_output import write_outputs
from training.precompute_parts import plan, plan_dir, plan_errors, ray_get
from training.precompute_plan import caption_sources
from training.precompute_workers import Encoder, probe_encoders
from training.shard_format import ERRORS_FILE, shard_set_id, write_encoders

PADDED_TOKENS = 512  # the padded layout the estimate compares against (GPT-OSS's 512-token limit)
TAR_OVERHEAD = 3 * 512 + 3 * 256 + 512  # per sample: 3 member headers, average padding, safetensors header


def shards_dir(data: str | Path) -> Path:
    return Path(data) / "shards"


def estimate_storage(counts: dict[str, int], chars: dict[str, int], table: BucketTable, probe: dict,
                     cfg: PrecomputeConfig) -> dict:
    """Bytes per sample (latent per bucket from `counts`, mean tokens per variant × feature width × dtype, the
    captions' `chars` in meta.json) and in total, and the same sample with every caption padded to 512 tokens in
    float32."""
    c, f, dim = probe["channels"], probe["factor"], probe["feature_dim"]
    cells = {b.name: c * (b.width // f) * (b.height // f) for b in table.buckets}
    samples = sum(counts.values())
    mean_cells = sum(cells[b] * n for b, n in counts.items()) / samples if samples else 0.0
    latent = mean_cells * (2 if cfg.latent_dtype == "bfloat16" else 4)
    per_token = {"bfloat16": 2 * dim, "float8_e4m3fn": dim + 4}[cfg.text_dtype]
    tokens = {v: (sum(ls) / len(ls) if ls else 0.0) for v, ls in probe["lengths"].items()}
    text = sum(tokens.values()) * per_token
    captions = sum(chars.values()) / samples if samples else 0.0
    overhead = TAR_OVERHEAD + 300 + float(captions)  # + meta.json
    per_sample = latent + text + overhead
    padded_text = len(cfg.variants) * PADDED_TOKENS * dim * 4
    return {"samples": samples, "per_sample": per_sample, "total": per_sample * samples, "latent": latent,
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


# --- encoding -----------------------------------------------------------------------------------------------------


def _gpus(cfg: PrecomputeConfig) -> float:
    import ray

    return cfg.gpus_per_actor if cfg.gpus_per_actor is not None else int(ray.cluster_resources().get("GPU", 0) >= 1)


def encode_shards(todo: list[dict], cfg: PrecomputeConfig, data: Path, set_dir: Path) -> tuple[list[dict], dict]:
    """The unfinished shards over `encoder_actors` actors (spread over the nodes), two calls queued per actor so
    none waits for the driver; returns the shards' records ({shard, plan, samples, bytes, errors, node}) and the
    stream's timings."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gpus, actors = _gpus(cfg), min(cfg.encoder_actors, len(todo))
    nodes = ray.nodes()
    # one actor per node in turn, by room (Ray's SPREAD is best effort); a decode task needs a whole CPU on a node
    order = node_order(nodes, actors, "GPU" if gpus else "CPU", gpus or cfg.cpus_per_actor)
    free = [n["Resources"].get("CPU", 0) - order.count(n["NodeID"]) * cfg.cpus_per_actor for n in nodes if n["Alive"]]
    if max(free, default=0) < 1:
        raise ValueError(f"precompute: {actors} encoder actors × cpus_per_actor {cfg.cpus_per_actor:g} leave no node "
                         "of the Ray cluster a CPU for decoding; lower encoder_actors or cpus_per_actor")
    remote = ray.remote(Encoder)
    pool = [remote.options(num_cpus=cfg.cpus_per_actor, num_gpus=gpus,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(cfg)
            for node in order]
    queue, pending, records = deque(todo), {}, []
    started, first, n_first = time.perf_counter(), None, 0
    with progress_bar(total=len(todo), desc="precompute", unit="shard") as bar:
        for actor in pool + pool:
            if queue:
                pending[actor.encode_shard.remote(str(set_dir), str(data), queue.popleft())] = actor
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            records.append(ray_get(ref))
            if first is None:
                first, n_first = time.perf_counter(), records[0]["samples"] + len(records[0]["errors"])
            if queue:
                pending[actor.encode_shard.remote(str(set_dir), str(data), queue.popleft())] = actor
            bar.update(1)
    ended = time.perf_counter()
    for actor in pool:
        ray.kill(actor)
    rows = sum(s["rows"] for s in todo)
    steady = (rows - n_first) / (ended - first) if first and ended > first else None
    return records, {"encode_s": round(ended - started, 3), "first_output_s": round((first or ended) - started, 3),
                     "steady_samples_per_s": steady, "encoded": rows, "gpus_per_actor": gpus}


def _probe(cfg: PrecomputeConfig, texts: dict[str, list[str]]) -> dict:
    """probe_encoders on an encoder's resources (a GPU when the cluster has one); its own errors, unwrapped."""
    import ray

    task = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=_gpus(cfg))(probe_encoders)
    return ray_get(task.remote(cfg, texts))


def precompute(data: str | Path, cfg: PrecomputeConfig, ray_address: str | None = None) -> Path:
    """Run (or finish) the shard set of `cfg` under DATA/shards/; returns its directory."""
    data = Path(data)
    started = time.perf_counter()
    table = table_for(cfg)
    sources = caption_sources(data, cfg.variants, cfg.caption_model, cfg.caption_prompts)
    record = encoders_record(cfg, table, sources)  # a wrong spec or path fails here, in one line, before Ray starts
    init_ray(ray_address)
    set_dir = shards_dir(data) / shard_set_id(record)
    clock = time.perf_counter()
    summary = plan(data, cfg, set_dir, table, sources)  # ValueError when nothing is captioned
    timings = {"ray_s": round(clock - started, 3), "plan_s": round(time.perf_counter() - clock, 3),
               **summary["seconds"]}
    clock = time.perf_counter()
    probe = _probe(cfg, summary["sample"])
    timings["probe_s"] = round(time.perf_counter() - clock, 3)
    if problems := loaded_mismatches(record, probe):
        raise ValueError("precompute: the loaded encoders disagree with the cache key made from their config "
                         f"files: {'; '.join(problems)}")

    est = estimate_storage(summary["counts"], summary["chars"], table, probe, cfg)
    print(format_estimate(est))
    shards = summary["shards"]
    for s in shards:
        if s["why"]:
            print(f"precompute: {s['why']}: redoing {s['shard']}")
    todo = [s for s in shards if not s["done"]]
    check_budget(est, cfg, est["per_sample"] * sum(s["rows"] for s in todo), set_dir)
    write_encoders(set_dir, record)
    write_text(set_dir / "config.precompute.yaml",
               yaml.safe_dump({"precompute": json.loads(cfg.model_dump_json())}, sort_keys=False))
    print(f"precompute: shard set {set_dir} — {len(shards)} shards, {len(shards) - len(todo)} "
          f"already done, {sum(s['rows'] for s in todo):,} images to encode")
    records = [s["marker"] for s in shards if s["done"]]
    nodes: Counter = Counter()
    if todo:
        encoded, stream = encode_shards(todo, cfg, data, set_dir)
        records += encoded
        nodes.update(r["node"] for r in encoded)
        timings.update(stream)

    index, errors = write_outputs(set_dir, records, table, plan_errors(set_dir))
    shutil.rmtree(plan_dir(set_dir), ignore_errors=True)
    print(format_buckets(index, summary["changes"]))
    report = write_bucket_report(data / "reports" / "buckets.html", set_dir, index, summary["changes"],
                                 summary["skipped"], errors, est)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    out = {"set_id": set_dir.name, "samples": int(index["samples"].sum()), "errors": len(errors),
           "skipped": dict(summary["skipped"]), "small_buckets": summary["changes"], "estimate": est,
           "parts": summary["parts"], "shards": len(shards), "already_done": len(shards) - len(todo),
           "encoded_by_node": dict(sorted(nodes.items())), "seconds": timings}
    write_json(data / "reports" / "precompute.json", out, default=float)
    print(f"precompute: {out['samples']:,} samples in {len(index)} shards, {len(errors)} errors "
          f"({set_dir / ERRORS_FILE}); report at {report}")
    return set_dir
