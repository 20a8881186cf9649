"""`lensforge caption`: every kept image of the manifest, re-captioned per variant into DATA/captions/.

    lensforge caption --data data --base-url http://127.0.0.1:8001/v1 --model gpt-4.1-mini --variants dense,short

Resumable by construction: a (key, variant) already `ok` in DATA/captions/part-*.parquet for this model and
prompt_id is never requested again (another model or prompt version captions anew, beside the old rows); errors
and refusals are asked again on the next run. Every answer is journaled the moment it arrives
(captioning/journal.py) and compacted into Parquet parts every `flush_rows` rows or `flush_s` seconds, so a kill
loses only the requests in flight; a rerun first replays what journals hold. SIGTERM / SIGINT stop cleanly: no new
request, up to `drain_s` for those in flight, then exit 143 / 130 with a one-line account (captioning/worker.py).

Steps: replay journals → the manifest's parts, and per part a small summary of its pending work (its kept rows
minus the ok captions of its key range; captioning/plan.py), computed here or, with `workers` > 1, in Ray tasks →
the parts dealt to the workers (part i → worker i % n), each planning its own parts as it reaches them → images
read per chunk, one chunk ahead in a thread → requests under a per-worker rate controller and a shared budget →
rows → journal → parts → summary (captioning/worker.py holds the per-worker part). The driver holds the list of
parts and their summaries, never a row per key. `workers` > 1 runs Ray actors spread over the cluster's nodes
(captioning/ray_workers.py), each with its own event loop, journal and parts, sharing one budget.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from captioning.config import CaptionConfig
from captioning.journal import replay
from captioning.ledger import LocalBudget, price_for, prior_spend
from captioning.plan import part_chunks, part_pending, part_summaries, sample_items, totals
from captioning.presets import Preset, resolve_variants
from captioning.request import build_request, request_model, variant_groups
from captioning.schema import STATUS_OK, captions_dir, key_ranges
from captioning.worker import Stats, Stopped, Worker, read_images, run_with_signals
from common.atomic import write_json
from common.progress import progress_bar
from curation.manifest import manifest_parts


def pending_work(data: str | Path, presets: dict[str, Preset], model: str) -> list[dict]:
    """Every part's `plan.part_pending`, concatenated: {key, alt_text, shard, member, variants} per kept key with
    a variant not yet ok for this captioner `model` and each preset's prompt_id, in key order. Journals left by an
    interrupted run are replayed into parts first: their rows count as done. Holds the whole job: for tests and
    small DATA; `caption` plans per part."""
    parts = manifest_parts(data)
    replay_journals(data)
    ranges = key_ranges(data)
    return [item for part in parts for item in part_pending(data, part, presets, model, ranges)]


def replay_journals(data: str | Path) -> None:
    """Compact what an interrupted run's journals hold into parts (captioning/journal.py), saying so if anything."""
    message = replay(data).message(data)
    if message:
        print(message, flush=True)


def summaries_of(data, cfg: CaptionConfig, presets: dict[str, Preset], parts: list[Path]) -> list[dict]:
    """Every part's `plan.part_summary`: here with one worker, else in Ray tasks spread over the cluster."""
    if cfg.workers == 1:
        return part_summaries(data, presets, request_model(cfg), parts)
    from captioning.ray_workers import ray_summaries

    return ray_summaries(data, cfg, presets, parts)


def run_local(data, cfg: CaptionConfig, presets: dict[str, Preset], parts: list[str], pairs: int, run_id: str,
              spent: float = 0.0) -> dict:
    """One Worker in this process over `parts` (their `pairs` pending size the progress bar)."""
    chunks = part_chunks(data, parts, presets, request_model(cfg), cfg.chunk_size)
    with progress_bar(total=pairs, desc="caption", unit="caption", dynamic_ncols=True) as bar:
        budget = LocalBudget(cfg.max_cost_usd, bar, spent)
        return asyncio.run(run_with_signals(Worker(data, cfg, presets, budget, run_id, 0), chunks))


def dry_run(data, cfg: CaptionConfig, presets: dict[str, Preset], summaries: list[dict]) -> dict:
    """Tokens and cost of the whole pending job, measured on a sample of its images drawn over the parts
    (plan.sample_items) and scaled by the summaries' counts; sends nothing."""
    from captioning.ledger import cost_usd, prompt_tokens_estimate
    from captioning.request import JSON_KEY_TOKENS
    from captioning.tokens import TOKENS_PER_WORD

    sample = sample_items(data, summaries, presets, request_model(cfg), cfg.dry_run_sample)
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
    todo = Counter()  # variant → pairs pending, over all parts
    for summary in summaries:
        todo.update(summary["pairs"])
    standard, batch = price_for(cfg.model or "", cfg), price_for(cfg.model or "", cfg, batch=True)
    out = {"variants": {}, "sampled_images": len(sample), "pending_images": totals(summaries)[1]}
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
    parts = manifest_parts(data)  # a clear error before anything else when there is no manifest
    replay_journals(data)
    summaries = summaries_of(data, cfg, presets, parts)
    pairs, images = totals(summaries)
    if dry:
        est = dry_run(data, cfg, presets, summaries)
        print(format_dry_run(est, cfg.model))
        return est
    print(f"caption: {pairs} caption(s) of {images} image(s) to request "
          f"({', '.join(presets)}; model {cfg.model}; {cfg.workers} worker(s))")
    if not pairs:
        return Stats().as_dict()
    # Sorts by start time; unique even for two runs in the same second (parts are never overwritten).
    now = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"
    if cfg.workers == 1:
        run = run_local
    else:
        from captioning.ray_workers import run_ray as run
    spent = prior_spend(data)
    todo = [s["part"] for s in summaries if s["images"]]  # only parts with work are dealt
    stats = run(data, cfg, presets, todo, pairs, run_id, spent)
    stats["total_spent_usd"] = spent + stats["cost_usd"]
    print(format_summary(stats, pairs, cfg))
    write_run_record(data, stats, pairs)
    if stats["signal"]:
        message = format_stopped(stats, data, cfg)
        sys.stdout.flush()  # the summary first, the account last
        print(message, file=sys.stderr, flush=True)
        raise Stopped(stats["signal"], message)
    return stats


def write_run_record(data, stats: dict, pairs: int) -> None:
    """DATA/reports/caption.json: this run's counts, cost and the captions each Ray node finished."""
    outcomes = {f"{v}/{status}": n for (v, status), n in sorted(
        (tuple(k) if not isinstance(k, tuple) else k, n) for k, n in stats["outcomes"].items())}
    write_json(Path(data) / "reports" / "caption.json",
               {"pending": pairs, "outcomes": outcomes, "requests": stats["requests"], "cost_usd": stats["cost_usd"],
                "total_spent_usd": stats["total_spent_usd"], "nodes": stats.get("nodes", {})})


def format_stopped(stats: dict, data, cfg: CaptionConfig) -> str:
    """The one line a stopped run ends with: what is on disk, what was abandoned, what to do."""
    name = signal.Signals(stats["signal"]).name
    return (f"caption: stopped by {name}: {stats['rows']} answer row(s) of this run saved in {captions_dir(data)}, "
            f"{stats['abandoned']} request(s) in flight abandoned (drain_s {cfg.drain_s:g}); "
            "rerun the same command to finish what is left")
