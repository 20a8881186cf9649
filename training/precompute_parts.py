"""Precompute's plan as Ray tasks over the manifest's parts: the driver holds the list of parts, per-part counts
and one small record per shard, never a row. In the current Ray session (what bench/scale.py times as "precompute
planning"):

    summary = plan(data, cfg, set_dir)   # {"counts", "changes", "skipped", "shards": [{shard, plan, rows, done}], …}

  0. key ranges of every manifest part (tasks over chunks of their Parquet footers) and caption part
     (captioning.schema.key_ranges), so that a part's task opens only the caption parts that can hold its keys
     (captions are not partitioned by key);
  1. candidates, one task per manifest part: its kept rows ⋈ its key range's captions, image offsets, bucket
     (precompute_plan.py) → _plan/candidates/<part>.parquet, errors → _plan/errors/<part>.parquet; it returns
     counts per bucket, skipped keys per reason, caption characters and the captions of its `estimate_sample`
     smallest sha1 keys (the probe's sample: the smallest over all parts, whatever order the tasks end in);
  2. the driver: counts summed → small buckets merged or dropped (`small_buckets`, as before) → each bucket's rows
     numbered part after part: offset[part][bucket] = its rows in the earlier parts;
  3. place, one task per part: merges applied; a bucket's rows in sha1 order get numbers from the part's offset;
     row n of bucket b goes to group n // group_rows → _plan/groups/<b>/<g>/<part>.parquet;
  4. seal, one task per group: its rows from every part, in sha1 order, cut into shards of shard_size; each
     shard's hash (`shard_hash`); a shard whose done marker is for that hash and whose tar is as recorded is done,
     the others lose their old tar and their rows go to _plan/shards/<b>/shard-N.parquet for the encoders.

Shards: a bucket of n rows has ceil(n / shard_size) shards, each of shard_size rows but the bucket's last, as
before; shard i is cut from group i // K (K = group_rows / shard_size): its rows are a sha1-random draw from a
window of group_rows rows of its bucket in consecutive manifest parts, not from the whole bucket (that would be a
global sort), so no task holds more than group_rows rows (GROUP_ROWS = 32,768: for a bucket with a fifth of the
rows, ~16 input shards of 10,000 URLs).
A bucket with one group (group_rows ≥ its rows: any small DATA) gets precompute_plan.assign_shards's shards. The
same inputs give the same shards whatever the cluster and the tasks' order. Planning is redone on every run
(resume is per shard, by hash); _plan/ is removed when the run has written its index.
"""

from __future__ import annotations

import bisect
import heapq
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from captioning.schema import KeyRanges, key_ranges
from common.atomic import atomic_path
from curation.manifest import manifest_parts
from training.buckets import BucketTable
from training.cache_key import table_for
from training.precompute_config import PrecomputeConfig
from training.precompute_output import clean, settle_shard
from training.precompute_plan import (apply_changes, bucket_rows, caption_column, caption_sources, in_shard_order,
                                      locate_images, order_key, read_candidates, shard_hash, small_buckets)
from training.shard_format import shard_name

GROUP_ROWS = 32_768  # rows of a bucket one seal task holds (~70 MB of plan rows with three ~1 KB captions)
RANGE_CHUNK = 256  # manifest footers read per task
PLAN_COLUMNS = ["key", "shard_in", "offset", "size", "width", "height", "bucket", "base", "ratio", "upscaled"]


def plan_dir(set_dir: Path) -> Path:
    return Path(set_dir) / "_plan"


def group_dir(set_dir: Path, bucket: str, group: int) -> Path:
    return plan_dir(set_dir) / "groups" / bucket / f"{group:06d}"


def shard_rows_file(set_dir: Path, shard: str) -> Path:
    """`_plan/shards/64x64/shard-000003.parquet`: the rows the encoder of `64x64/shard-000003.tar` reads."""
    return plan_dir(set_dir) / "shards" / Path(shard).with_suffix(".parquet")


def _write(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)


# --- Ray tasks ----------------------------------------------------------------------------------------------------


def ray_get(ref):
    """ray.get, with a worker's own error raised as itself (one-line errors stay one line)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, Exception):
            raise err.cause from None
        raise


def run_tasks(fn, jobs: list[tuple], num_cpus: float = 1):
    """Yield (job index, fn(*job)) as Ray tasks finish, at most 2 × the cluster's CPUs in flight (the driver
    holds their refs, then one result at a time)."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(fn)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo, pending = iter(enumerate(jobs)), {}
    for i, job in todo:
        pending[task.remote(*job)] = i
        if len(pending) >= limit:
            break
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        result = ray_get(ref)
        for j, job in todo:
            pending[task.remote(*job)] = j
            break
        yield i, result


def part_ranges(paths: list[str]) -> list[tuple[str, str] | None]:
    """(first key, last key) of each manifest part, from its row groups' statistics (the key column read where they
    are missing); None for a part without rows. (Caption parts: captioning.schema.key_ranges.)"""
    out = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("key")
        stats = [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]
        if meta.num_rows == 0:
            out.append(None)
        elif all(s is not None and s.has_min_max for s in stats):
            out.append((min(s.min for s in stats), max(s.max for s in stats)))
        else:
            bounds = pc.min_max(pq.read_table(path, columns=["key"])["key"])
            out.append((bounds["min"].as_py(), bounds["max"].as_py()))
    return out


def captions_by_part(parts: list[tuple[str, str] | None], captions: KeyRanges) -> list[KeyRanges]:
    """For each manifest part (its key range), the caption parts whose key range meets it, and those whose range
    is unknown: a bisect over the manifest parts, which are disjoint and in key order (all caption parts to every
    part if they are not). The driver sends a task only its part's share of the caption parts."""
    spans = [r for r in parts if r is not None]
    if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])):
        return [list(captions) for _ in parts]
    lows, highs = [r[0] for r in spans], [r[1] for r in spans]
    where = [i for i, r in enumerate(parts) if r is not None]
    out: list[KeyRanges] = [[] for _ in parts]
    for entry in captions:
        _, lo, hi = entry
        hit = range(len(spans)) if lo is None else range(bisect.bisect_left(highs, lo), bisect.bisect_right(lows, hi))
        for k in hit:
            out[where[k]].append(entry)
    return out


def candidates_part(data: str, part: str, ranges: KeyRanges, variants: list[str], sources: dict,
                    table: BucketTable, set_dir: str, sample: int) -> dict:
    """Step 1 on one manifest part (`ranges`: the caption parts that may hold its keys): its plan rows and errors
    to _plan/; a summary without rows."""
    stem, set_dir = Path(part).stem, Path(set_dir)
    rows, skipped = read_candidates(data, variants, sources, part=Path(part), ranges=ranges)
    candidates = len(rows)
    rows, errors = locate_images(data, rows)
    rows = bucket_rows(rows, table)[[*PLAN_COLUMNS, *(caption_column(v) for v in variants)]]
    if errors:
        errors_file = plan_dir(set_dir) / "errors" / f"{stem}.parquet"
        _write(pd.DataFrame(errors, columns=["key", "stage", "error"]), errors_file)
    if len(rows):
        _write(rows, plan_dir(set_dir) / "candidates" / f"{stem}.parquet")
    texts = rows[[caption_column(v) for v in variants]]
    chars = texts.apply(lambda s: s.str.len()).groupby(rows["bucket"]).sum()
    order = rows["key"].map(order_key)
    first = order.sort_values().index[:sample]
    return {"part": stem, "candidates": candidates, "skipped": dict(skipped), "errors": len(errors),
            "counts": rows["bucket"].value_counts().to_dict(),
            "chars": {b: {v: int(chars.at[b, caption_column(v)]) for v in variants} for b in chars.index},
            "sample": [(order[i], rows.at[i, "key"], texts.loc[i].tolist()) for i in first]}


def place_part(set_dir: str, stem: str, changes: list[dict], table: BucketTable, offsets: dict[str, int],
               group_rows: int) -> int:
    """Step 3 on one part's candidates: merges applied, each bucket's rows numbered in sha1 order from the part's
    offset, written to their group's folder; returns the rows placed."""
    path = plan_dir(Path(set_dir)) / "candidates" / f"{stem}.parquet"
    if not path.is_file():
        return 0
    rows = in_shard_order(apply_changes(pd.read_parquet(path), changes, table))
    number = rows.groupby("bucket").cumcount() + rows["bucket"].map(offsets)
    for (bucket, group), part in rows.groupby([rows["bucket"], number // group_rows], sort=True):
        _write(part, group_dir(Path(set_dir), bucket, int(group)) / f"{stem}.parquet")
    path.unlink()
    return len(rows)


def seal_group(set_dir: str, bucket: str, group: int, n: int, first: int, shard_size: int,
               variants: list[str]) -> list[dict]:
    """Step 4 on one group of `n` rows whose first shard is number `first` of its bucket: its shards, each
    {shard, plan (hash), rows, done, why (a marker of this plan that cannot vouch for its tar), marker | file}."""
    set_dir, folder = Path(set_dir), group_dir(Path(set_dir), bucket, group)
    plan = in_shard_order(pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]))
    if len(plan) != n:
        raise RuntimeError(f"precompute: {folder} holds {len(plan):,} rows, {n:,} planned: the plan folder "
                           "changed under this run; rerun the same command")
    out = []
    for i, start in enumerate(range(0, n, shard_size)):
        shard = f"{bucket}/{shard_name(first + i)}"
        part = plan.iloc[start:start + shard_size]
        plan_hash = shard_hash(part, variants)
        record, why = settle_shard(set_dir, shard, plan_hash)
        entry = {"shard": shard, "plan": plan_hash, "rows": len(part), "done": record is not None, "why": why}
        if record is None:
            entry["file"] = str(shard_rows_file(set_dir, shard))
            _write(part, Path(entry["file"]))
        else:
            entry["marker"] = record
        out.append(entry)
    shutil.rmtree(folder)
    return out


# --- the driver ---------------------------------------------------------------------------------------------------


def layout(counts: dict[str, int], shard_size: int, group_rows: int) -> list[tuple]:
    """Seal jobs' (bucket, group, rows, first shard): each bucket's rows in groups of group_rows (a multiple of
    shard_size), shards numbered through the bucket."""
    per_group = group_rows // shard_size
    return [(b, g, min(group_rows, n - g * group_rows), g * per_group)
            for b, n in sorted(counts.items()) for g in range(math.ceil(n / group_rows))]


def _merge(summaries: list[dict], changes: list[dict]) -> tuple[list[dict], Counter]:
    """Each part's offset per bucket after the small-bucket changes (rows in the parts before it), and the
    buckets' final counts."""
    into = {c["bucket"]: c["into"] for c in changes}
    offsets, total = [], Counter()
    for s in summaries:
        offsets.append(dict(total))
        for bucket, n in s["counts"].items():
            if into.get(bucket, bucket):
                total[into.get(bucket, bucket)] += n
    return [{b: o.get(b, 0) for b in total} for o in offsets], total


def _sampled(best: list, new: list, k: int) -> list:
    return heapq.nsmallest(k, best + new)  # (sha1, key, texts): the same k whichever part ends first


def _refuse(set_dir: Path, data: Path, cfg: PrecomputeConfig, skipped: Counter) -> None:
    shutil.rmtree(plan_dir(set_dir), ignore_errors=True)
    for folder in (set_dir, set_dir.parent):  # made by this run for nothing
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    raise ValueError(f"precompute: nothing to encode: no kept image of {data} has every variant of "
                     f"{cfg.variants} ({dict(skipped) or 'no kept images'}); run `lensforge caption` first")


def _candidates(data: Path, cfg: PrecomputeConfig, set_dir: Path, table: BucketTable,
                sources: dict) -> tuple[list[dict], Counter, list]:
    """Passes 0 and 1: each part's summary (in part order), the skipped keys, the probe's sample."""
    parts = manifest_parts(data)
    ranges: list = [None] * len(parts)
    chunks = [([str(p) for p in parts[i:i + RANGE_CHUNK]],) for i in range(0, len(parts), RANGE_CHUNK)]
    for i, found in run_tasks(part_ranges, chunks):
        ranges[i * RANGE_CHUNK:i * RANGE_CHUNK + len(found)] = found
    by_part = captions_by_part(ranges, key_ranges(data))
    summaries: list = [None] * len(parts)
    skipped, sample = Counter(), []
    jobs = [(str(data), str(p), by_part[i], cfg.variants, sources, table, str(set_dir), cfg.estimate_sample)
            for i, p in enumerate(parts)]
    for i, s in run_tasks(candidates_part, jobs):
        skipped.update(s["skipped"])
        sample = _sampled(sample, s.pop("sample"), cfg.estimate_sample)
        summaries[i] = s
    return summaries, skipped, sample


def plan(data: str | Path, cfg: PrecomputeConfig, set_dir: str | Path, table: BucketTable | None = None,
         sources: dict | None = None, group_rows: int | None = None) -> dict:
    """Passes 0-4 in the current Ray session; set_dir/_plan/ is made anew. Returns {"parts", "candidates",
    "skipped", "plan_errors", "counts" (final, per bucket), "changes", "chars" (caption characters per variant),
    "sample" ({variant: captions}), "shards" (sorted), "seconds"}; ValueError when nothing is captioned.
    `group_rows` (default GROUP_ROWS) is rounded down to whole shards."""
    data, set_dir, times, clock = Path(data), Path(set_dir), {}, time.perf_counter()
    table = table_for(cfg) if table is None else table
    if sources is None:
        sources = caption_sources(data, cfg.variants, cfg.caption_model, cfg.caption_prompts)
    group_rows = max(1, (group_rows or GROUP_ROWS) // cfg.shard_size) * cfg.shard_size
    shutil.rmtree(plan_dir(set_dir), ignore_errors=True)  # a killed run's plan: redone, never trusted
    plan_dir(set_dir).mkdir(parents=True)

    summaries, skipped, sample = _candidates(data, cfg, set_dir, table, sources)
    candidates = sum(s["candidates"] for s in summaries)
    by = "".join(f"; {v} by {m} ({p})" for v, (m, p) in sources.items())
    print(f"precompute: {candidates:,} kept images with every variant of {cfg.variants}{by}; "
          f"{sum(skipped.values()):,} skipped" + (f" ({dict(skipped)})" if skipped else ""))
    if not candidates:
        _refuse(set_dir, data, cfg, skipped)
    times["plan_candidates_s"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()

    counts = sum((Counter(s["counts"]) for s in summaries), Counter())
    changes = small_buckets(dict(counts), table, cfg.min_bucket_samples, cfg.small_buckets)
    offsets, final = _merge(summaries, changes)
    jobs = [(str(set_dir), s["part"], changes, table, offsets[i], group_rows) for i, s in enumerate(summaries)]
    placed = sum(n for _, n in run_tasks(place_part, jobs))
    if placed != sum(final.values()):
        raise RuntimeError(f"precompute: {placed:,} rows placed, {sum(final.values()):,} planned: the plan folder "
                           "changed under this run; rerun the same command")
    times["plan_place_s"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()

    clean(set_dir, {f"{b}/{shard_name(i)}" for b, n in final.items() for i in range(math.ceil(n / cfg.shard_size))})
    jobs = [(str(set_dir), *g, cfg.shard_size, cfg.variants) for g in layout(dict(final), cfg.shard_size, group_rows)]
    shards = sorted((s for _, out in run_tasks(seal_group, jobs) for s in out), key=lambda s: s["shard"])
    times["plan_seal_s"] = round(time.perf_counter() - clock, 3)

    dropped = {c["bucket"] for c in changes if not c["into"]}  # their rows' captions are not stored
    chars = {v: sum(n[v] for s in summaries for b, n in s["chars"].items() if b not in dropped) for v in cfg.variants}
    return {"parts": len(summaries), "candidates": candidates, "skipped": skipped,
            "plan_errors": sum(s["errors"] for s in summaries), "counts": dict(final), "changes": changes,
            "chars": chars, "sample": {v: [t[2][i] for t in sample] for i, v in enumerate(cfg.variants)},
            "shards": shards, "seconds": times}


def plan_errors(set_dir: Path) -> list[dict]:
    """The plan's error rows ({key, stage, error}), in part order."""
    files = sorted((plan_dir(set_dir) / "errors").glob("*.parquet"))
    return [r for f in files for r in pd.read_parquet(f).to_dict("records")]
