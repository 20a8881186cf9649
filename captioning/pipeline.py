"""`lensforge caption`: every kept image of the manifest, re-captioned per variant into DATA/captions/.

    lensforge caption --data data --base-url http://127.0.0.1:8001/v1 --model gpt-4.1-mini --variants dense,short

Resumable by construction: a (key, variant) already `ok` in DATA/captions/part-*.parquet is never requested again;
errors and refusals are asked again on the next run. Rows are written as they come (tmp + rename, every
`flush_rows` rows or `flush_s` seconds), so a kill loses only the requests in flight.

Steps: pending work (manifest kept rows − ok captions) → images read per chunk, one chunk ahead in a thread →
requests under a per-worker rate controller and a shared budget → rows → Parquet parts → summary.
`workers` > 1 splits the pending keys over Ray actors, each with its own event loop and parts, sharing one budget.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from captioning.checks import words
from captioning.client import Sender, make_client, resolve_api_key
from captioning.config import CaptionConfig
from captioning.images import Image, load_images
from captioning.ledger import Ledger, price_for, prior_spend, reservation_usd
from captioning.presets import Preset, resolve_variants
from captioning.request import build_request, error_rows, parse_response, variant_groups
from captioning.schema import CAPTIONS_SCHEMA, STATUS_OK, captions_dir, read_captions
from curation.manifest import read_manifest

MANIFEST_COLUMNS = ["key", "alt_text", "shard", "member", "keep"]


def pending_work(data: str | Path, presets: dict[str, Preset]) -> list[dict]:
    """Kept manifest rows with the variants not yet `ok`: {key, alt_text, shard, member, variants}, in key order."""
    kept = read_manifest(data, columns=MANIFEST_COLUMNS)
    kept = kept.filter(pc.fill_null(kept["keep"], False)).sort_by("key").to_pandas()
    done = read_captions(data, columns=["key", "variant", "status"]).to_pandas()
    done = done[done["status"] == STATUS_OK]
    todo = {v: ~kept["key"].isin(done.loc[done["variant"] == v, "key"]) for v in presets}
    items = []
    for i, row in enumerate(kept.itertuples(index=False)):
        variants = [v for v in presets if todo[v].iat[i]]
        if variants:
            items.append({"key": row.key, "alt_text": row.alt_text, "shard": row.shard, "member": row.member,
                          "variants": variants})
    return items


class PartWriter:
    """Rows → DATA/captions/part-<run>-<worker>-<n>.parquet, written to a temporary name and renamed."""

    def __init__(self, data: str | Path, run_id: str, worker: int, cfg: CaptionConfig):
        self.out = captions_dir(data)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix, self.cfg = f"part-{run_id}-{worker:03d}", cfg
        self.rows: list[dict] = []
        self.n = 0
        self.last = time.monotonic()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.cfg.flush_rows:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=CAPTIONS_SCHEMA)
        name = f"{self.prefix}-{self.n:05d}.parquet"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out / name)
        self.rows, self.n = [], self.n + 1

    async def ticker(self) -> None:
        """Flush at least every `flush_s`, so slow requests still reach the disk."""
        while True:
            await asyncio.sleep(self.cfg.flush_s)
            if time.monotonic() - self.last >= self.cfg.flush_s:
                self.flush()


@dataclass
class Stats:
    """Final outcome of each (key, variant) of this run, plus what it cost."""

    outcomes: Counter = field(default_factory=Counter)  # (variant, status) → pairs
    words: Counter = field(default_factory=Counter)  # variant → words over ok captions
    requests: int = 0
    cost_usd: float = 0.0
    stopped: str | None = None  # "budget" when the budget stopped the run early
    transport: Counter = field(default_factory=Counter)

    def merge(self, other: dict) -> None:
        self.outcomes.update(other["outcomes"])
        self.words.update(other["words"])
        self.requests += other["requests"]
        self.cost_usd += other["cost_usd"]
        self.stopped = self.stopped or other["stopped"]
        self.transport.update(other["transport"])

    def as_dict(self) -> dict:
        return {"outcomes": dict(self.outcomes), "words": dict(self.words), "requests": self.requests,
                "cost_usd": self.cost_usd, "stopped": self.stopped, "transport": dict(self.transport)}


class LocalBudget(Ledger):
    """The in-process budget (workers: 1), which also drives the progress bar."""

    def __init__(self, budget_usd: float | None, bar: tqdm | None, spent: float = 0.0):
        super().__init__(budget_usd, spent)
        self.bar, self.done, self.prior = bar, Counter(), spent

    def count(self, status: str, n: int = 1) -> None:
        self.done[status] += n
        if self.bar is not None:
            self.bar.update(n)
            done = " ".join(f"{k}={v}" for k, v in self.done.items())
            self.bar.set_postfix_str(f"${self.spent - self.prior:.4f} {done}", refresh=False)

    def flush(self, final: bool = False) -> None:
        pass


async def prefetch(data: str | Path, items: list[dict], cfg: CaptionConfig):
    """(chunk, images) pairs; the next chunk's images are read and resized in a thread meanwhile."""
    chunks = [items[i:i + cfg.chunk_size] for i in range(0, len(items), cfg.chunk_size)]
    nxt = asyncio.create_task(asyncio.to_thread(load_images, data, chunks[0], cfg)) if chunks else None
    try:
        for i, chunk in enumerate(chunks):
            images = await nxt
            nxt = (asyncio.create_task(asyncio.to_thread(load_images, data, chunks[i + 1], cfg))
                   if i + 1 < len(chunks) else None)
            yield chunk, images
    finally:
        if nxt is not None:
            nxt.cancel()


class Worker:
    """One event loop's share of the job: requests under a rate controller, rows to its own Parquet parts."""

    def __init__(self, data, cfg: CaptionConfig, presets: dict[str, Preset], budget, run_id: str, worker: int,
                 api_key: str | None = None):
        self.data, self.cfg, self.presets, self.budget = data, cfg, presets, budget
        self.writer = PartWriter(data, run_id, worker, cfg)
        self.stats = Stats()
        self.price = price_for(cfg.model or "", cfg)
        self.slots = asyncio.Semaphore(cfg.concurrency)  # tasks alive (waiting, retrying or sending)
        self.api_key = api_key or resolve_api_key(cfg)
        self.sender: Sender | None = None
        self.tasks: set[asyncio.Task] = set()
        self.failures: list[BaseException] = []

    def record(self, rows: list[dict], final: bool) -> None:
        """Write attempt rows; count the (key, variant) outcomes that are final for this run."""
        self.writer.add(rows)
        for r in rows:
            self.stats.cost_usd += r["cost_usd"] or 0.0
            if final or r["status"] == STATUS_OK:
                self.stats.outcomes[(r["variant"], r["status"])] += 1
                self.budget.count(r["status"])
                if r["status"] == STATUS_OK:
                    self.stats.words[r["variant"]] += words(r["text"])

    async def ask(self, item: dict, image: Image, variants: list[str], reserved: list[float]) -> None:
        """Send the bodies of `variants` (budget already reserved), then re-ask failed checks while allowed."""
        retries = self.cfg.retry_failed_checks
        bodies = build_request(item["key"], image.data_url, variants, self.presets, self.cfg, item["alt_text"])
        groups = variant_groups(variants, self.cfg)
        while True:
            # A key's requests go out together; the rate controller caps what is really in flight.
            failed = sum(await asyncio.gather(*(self.ask_one(item["key"], g, b, est, final=retries == 0)
                                                for g, b, est in zip(groups, bodies, reserved))), [])
            if not failed or retries == 0:
                return
            retries -= 1
            bodies = build_request(item["key"], image.data_url, failed, self.presets, self.cfg, item["alt_text"])
            groups = variant_groups(failed, self.cfg)
            reserved = [reservation_usd(b, image.width, image.height, self.price) for b in bodies]
            if self.stats.stopped or not self.budget.reserve(sum(reserved)):
                self.stats.stopped = "budget"  # no re-ask: the last attempt's row stands, the next run asks again
                self.stats.outcomes.update((v, "error") for v in failed)
                self.budget.count("error", len(failed))
                return

    async def ask_one(self, key: str, group: list[str], body: dict, reserved: float, final: bool) -> list[str]:
        """One request → rows; returns the variants worth asking again (failed checks, malformed bodies)."""
        self.stats.requests += 1
        answer = await self.sender.send(body, key)
        if answer.body is not None:
            rows = parse_response(answer.body, [self.presets[v] for v in group], self.cfg, key=key)
        else:
            rows = error_rows(key, group, self.cfg, answer.error)
        for r in rows:
            r["latency_s"] = round(answer.latency_s, 4)
        self.budget.settle(reserved, sum(r["cost_usd"] for r in rows))
        retryable = answer.body is not None or (answer.error or "").startswith("malformed")
        failed = [r["variant"] for r in rows if r["status"] != STATUS_OK] if retryable else []
        self.record(rows, final=final or not failed)
        return failed

    async def launch(self, item: dict, image: Image | str) -> bool:
        """Reserve budget for one key's requests and start them; False once the budget is spent."""
        if isinstance(image, str):  # unreadable image: an error row per variant, nothing sent
            self.record(error_rows(item["key"], item["variants"], self.cfg, image), final=True)
            return True
        bodies = build_request(item["key"], image.data_url, item["variants"], self.presets, self.cfg,
                               item["alt_text"])
        reserved = [reservation_usd(b, image.width, image.height, self.price) for b in bodies]
        while not self.budget.reserve(sum(reserved)):
            if not self.tasks:  # nothing in flight will free room: stop before the budget is exceeded
                self.stats.stopped = "budget"
                return False
            await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)  # settles free room
            self.raise_failures()
        task = asyncio.create_task(self.ask(item, image, item["variants"], reserved))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())  # fatal (401, unknown model): stops the whole job now

    def raise_failures(self) -> None:
        if self.failures:
            raise self.failures[0]

    async def launch_chunk(self, chunk: list[dict], images: dict) -> bool:
        for item in chunk:
            await self.slots.acquire()
            self.raise_failures()
            if not await self.launch(item, images[item["key"]]):
                self.slots.release()
                return False
        return True

    async def run(self, items: list[dict]) -> dict:
        client = make_client(self.cfg, self.api_key)
        self.sender = Sender(client, self.cfg, self.api_key)
        ticker = asyncio.create_task(self.writer.ticker())
        try:
            async with client:
                try:
                    await self.feed(items)
                finally:  # on a fatal error or a kill: stop what is in flight before closing the client
                    pending = list(self.tasks)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            ticker.cancel()
            self.writer.flush()
            self.budget.flush(final=True)
        self.stats.transport.update(self.sender.counts)
        return self.stats.as_dict()

    async def feed(self, items: list[dict]) -> None:
        async for chunk, images in prefetch(self.data, items, self.cfg):
            if not await self.launch_chunk(chunk, images):
                break
        while self.tasks:
            await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
            self.raise_failures()
        self.raise_failures()


def run_local(data, cfg: CaptionConfig, presets: dict[str, Preset], items: list[dict], run_id: str,
              spent: float = 0.0) -> dict:
    pairs = sum(len(i["variants"]) for i in items)
    with tqdm(total=pairs, desc="caption", unit="caption", dynamic_ncols=True) as bar:
        budget = LocalBudget(cfg.max_cost_usd, bar, spent)
        return asyncio.run(Worker(data, cfg, presets, budget, run_id, 0).run(items))


def dry_run(data, cfg: CaptionConfig, presets: dict[str, Preset], items: list[dict]) -> dict:
    """Tokens and cost of the whole pending job, measured on a sample of its images; sends nothing."""
    from captioning.ledger import cost_usd, prompt_tokens_estimate
    from captioning.request import JSON_KEY_TOKENS
    from captioning.tokens import TOKENS_PER_WORD

    sample = random.Random(0).sample(items, min(cfg.dry_run_sample, len(items)))
    images = load_images(data, sample, cfg)
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
    items = pending_work(data, presets)
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
    return stats
