"""`lensforge caption`: every kept image of the manifest, re-captioned per variant into DATA/captions/.

    lensforge caption --data data --base-url http://127.0.0.1:8001/v1 --model gpt-4.1-mini --variants dense,short

Resumable by construction: a (key, variant) already `ok` in DATA/captions/part-*.parquet for this model and
prompt_id is never requested again (another model or prompt version captions anew, beside the old rows); errors
and refusals are asked again on the next run. Every answer is journaled the moment it arrives
(captioning/journal.py) and compacted into Parquet parts every `flush_rows` rows or `flush_s` seconds, so a kill
loses only the requests in flight; a rerun first replays what journals hold. SIGTERM / SIGINT stop cleanly: no new
request, up to `drain_s` for those in flight, then exit 143 / 130 with a one-line account (captioning/worker.py).

Steps: replay journals → pending work (manifest kept rows − ok captions) → images read per chunk, one chunk
ahead in a thread → requests under a per-worker rate controller and a shared budget → rows → journal → parts →
summary (captioning/worker.py holds the per-worker part). `workers` > 1 splits the pending keys over Ray actors
(captioning/ray_workers.py), each with its own event loop, journal and parts, sharing one budget.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc

from captioning.config import CaptionConfig
from captioning.journal import replay
from captioning.ledger import LocalBudget, price_for, prior_spend
from captioning.presets import Preset, resolve_variants
from captioning.request import build_request, request_model, variant_groups
from captioning.schema import SOURCE_COLUMNS, STATUS_OK, captions_dir, read_captions
from captioning.worker import Stats, Stopped, Worker, read_images, run_with_signals
from common.progress import progress_bar
from curation.manifest import read_manifest

MANIFEST_COLUMNS = ["key", "alt_text", "shard", "member", "keep"]


def pending_work(data: str | Path, presets: dict[str, Preset], model: str) -> list[dict]:
    """Kept manifest rows with the variants not yet `ok` for this captioner `model` and each preset's prompt_id
    (a new model or prompt captions anew; the old rows stay): {key, alt_text, shard, member, variants}, in key
    order. Journals left by an interrupted run are replayed into parts first: their rows count as done."""
    kept = read_manifest(data, columns=MANIFEST_COLUMNS)
    replay_journals(data)
    kept = kept.filter(pc.fill_null(kept["keep"], False)).sort_by("key").to_pandas()
    done = read_captions(data, columns=["key", "variant", "status", *SOURCE_COLUMNS]).to_pandas()
    done = done[(done["status"] == STATUS_OK) & (done["model"] == model)]
    todo = {v: ~kept["key"].isin(done.loc[(done["variant"] == v) & (done["prompt_id"] == p.prompt_id), "key"])
            for v, p in presets.items()}
    items = []
    for i, row in enumerate(kept.itertuples(index=False)):
        variants = [v for v in presets if todo[v].iat[i]]
        if variants:
            items.append({"key": row.key, "alt_text": row.alt_text, "shard": row.shard, "member": row.member,
                          "variants": variants})
    return items


def replay_journals(data: str | Path) -> None:
    """Compact what an interrupted run's journals hold into parts (captioning/journal.py), saying so if anything."""
    message = replay(data).message(data)
    if message:
        print(message, flush=True)


def run_local(data, cfg: CaptionConfig, presets: dict[str, Preset], items: list[dict], run_id: str,
              spent: float = 0.0) -> dict:
    pairs = sum(len(i["variants"]) for i in items)
    with progress_bar(total=pairs, desc="caption", unit="caption", dynamic_ncols=True) as bar:
        budget = LocalBudget(cfg.max_cost_usd, bar, spent)
        return asyncio.run(run_with_signals(Worker(data, cfg, presets, budget, run_id, 0), items))


def dry_run(data, cfg: CaptionConfig, presets: dict[str, Preset], items: list[dict]) -> dict:
    """Tokens and cost of the whole pending job, measured on a sample of its images; sends nothing."""
    from captioning.ledger import cost_usd, prompt_tokens_estimate
    from captioning.request import JSON_KEY_TOKENS
    from captioning.tokens import TOKENS_PER_WORD

    sample = random.Random(0).sample(items, min(cfg.dry_run_sample, len(items)))
    images = read_images(data, sample, cfg)
    seen = {v: Counter() for v in presets}  # per variant: pairs, requests, prompt, completion (sampled)
    for item in sample:
        image = images[item["key"]]
        if isinstance(image, str):
            continue
        bodies = build_request(item["key"], image.data_url, item["variants"], presets, cfg, item["alt_text"])
        for group, body in zip(variant_groups(item["variants"], cfg), bodies):
            prompt = prompt_tokens_estimate(body, image.width, image.height)
            for v in group:  # a JSON-mode request's prompt is shared by its variants
                extra = JSON_KEY_TOKENS if len(group) > 1 else 0
                seen[v].update(pairs=1, requests=1 / len(group), prompt=prompt / len(group),
                               completion=round(presets[v].target_words * TOKENS_PER_WORD) + extra)
    todo = Counter(v for item in items for v in item["variants"])
    standard, batch = price_for(cfg.model or "", cfg), price_for(cfg.model or "", cfg, batch=True)
    out = {"variants": {}, "sampled_images": len(sample), "pending_images": len(items)}
    for v, s in seen.items():
        scale = todo[v] / s["pairs"] if s["pairs"] else 0.0
        est = {"captions": todo[v], "requests": round(s["requests"] * scale),
               "prompt_tokens": round(s["prompt"] * scale), "completion_tokens": round(s["completion"] * scale)}
        est["cost_usd"] = cost_usd(standard, est["prompt_tokens"], est["completion_tokens"])
        est["batch_cost_usd"] = cost_usd(batch, est["prompt_tokens"], est["completion_tokens"])
        out["variants"][v] = est
    out["total"] = {k: sum(e[k] for e in out["variants"].values())
                    for k in ("captions", "requests", "prompt_tokens", "completion_tokens", "cost_usd",
                              "batch_cost_usd")}
    return out


def format_dry_run(est: dict, model: str | None) -> str:
    lines = [f"caption --dry-run: {est['pending_images']} images pending, estimated from {est['sampled_images']}"
             f" (model {model}); nothing was sent",
             f"  {'variant':<10}{'captions':>10}{'requests':>10}{'prompt tok':>14}{'completion tok':>16}"
             f"{'standard $':>12}{'batch $':>12}"]
    for name, e in [*est["variants"].items(), ("total", est["total"])]:
        lines.append(f"  {name:<10}{e['captions']:>10}{e['requests']:>10}{e['prompt_tokens']:>14}"
                     f"{e['completion_tokens']:>16}{e['cost_usd']:>12.4f}{e['batch_cost_usd']:>12.4f}")
    return "\n".join(lines)


def format_summary(stats: dict, pending_pairs: int, cfg: CaptionConfig) -> str:
    outcomes = Counter({tuple(k) if not isinstance(k, tuple) else k: n for k, n in stats["outcomes"].items()})
    lines = []
    for v in dict.fromkeys(v for v, _ in outcomes):
        counts = {st: n for (var, st), n in sorted(outcomes.items()) if var == v}
        ok = counts.get(STATUS_OK, 0)
        mean = f", {stats['words'].get(v, 0) / ok:.1f} words/caption" if ok else ""
        lines.append(f"  {v}: " + ", ".join(f"{st} {n}" for st, n in counts.items()) + mean)
    ok_pairs = sum(n for (_, st), n in outcomes.items() if st == STATUS_OK)
    lines.append(f"caption: ${stats['cost_usd']:.4f} over {stats['requests']} requests this run"
                 + (f"; retries: {dict(stats['transport'])}" if any(stats["transport"].values()) else ""))
    if stats["stopped"] == "budget":
        lines.append(f"caption: stopped before the budget would be exceeded: ${stats['total_spent_usd']:.4f} of "
                     f"${cfg.max_cost_usd:g} spent on DATA/captions; rerun with a higher --max-cost-usd to continue")
    left = pending_pairs - ok_pairs
    lines.append(f"caption: {left} caption(s) not ok yet" + ("; rerun the same command to retry them" if left else
                                                            "; all done"))
    return "caption: this run's captions per variant\n" + "\n".join(lines)


def caption(data: str | Path, cfg: CaptionConfig, dry: bool = False) -> dict:
    """Caption every pending (kept key, variant); returns this run's stats (or the dry-run estimate)."""
    presets = resolve_variants(cfg.variants, cfg.prompt_file)
    items = pending_work(data, presets, request_model(cfg))
    pairs = sum(len(i["variants"]) for i in items)
    if dry:
        est = dry_run(data, cfg, presets, items)
        print(format_dry_run(est, cfg.model))
        return est
    print(f"caption: {pairs} caption(s) of {len(items)} image(s) to request "
          f"({', '.join(presets)}; model {cfg.model}; {cfg.workers} worker(s))")
    if not items:
        return Stats().as_dict()
    # Sorts by start time; unique even for two runs in the same second (parts are never overwritten).
    now = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"
    if cfg.workers == 1:
        run = run_local
    else:
        from captioning.ray_workers import run_ray as run
    spent = prior_spend(data)
    stats = run(data, cfg, presets, items, run_id, spent)
    stats["total_spent_usd"] = spent + stats["cost_usd"]
    print(format_summary(stats, pairs, cfg))
    if stats["signal"]:
        message = format_stopped(stats, data, cfg)
        sys.stdout.flush()  # the summary first, the account last
        print(message, file=sys.stderr, flush=True)
        raise Stopped(stats["signal"], message)
    return stats


def format_stopped(stats: dict, data, cfg: CaptionConfig) -> str:
    """The one line a stopped run ends with: what is on disk, what was abandoned, what to do."""
    name = signal.Signals(stats["signal"]).name
    return (f"caption: stopped by {name}: {stats['rows']} answer row(s) of this run saved in {captions_dir(data)}, "
            f"{stats['abandoned']} request(s) in flight abandoned (drain_s {cfg.drain_s:g}); "
            "rerun the same command to finish what is left")
