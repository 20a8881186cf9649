"""One event loop's share of `lensforge caption`: requests under a rate controller and a budget, every answer
journaled the moment it arrives (captioning/journal.py), and a clean stop on SIGTERM / SIGINT.

    worker = Worker(data, cfg, presets, budget, run_id, worker=0)
    chunks = plan.part_chunks(data, parts, presets, model, cfg.chunk_size)  # its parts, planned as reached
    stats = asyncio.run(run_with_signals(worker, chunks))  # main thread: SIGTERM / SIGINT → worker.request_stop

Run in-process by pipeline.run_local (one worker) and inside each Ray actor by ray_workers.RayWorker (the driver
forwards its signals there). A worker is fed chunks of pending-work items ({key, alt_text, shard, member,
variants}); the next chunk is planned and its images read in a thread while the current one is sent.

A stop (`request_stop`): no new key is started, and nothing more is sent, neither a retry nor a re-ask of a failed
check (client.Sender.stop); the requests in flight get up to `drain_s` to answer, each answer journaled as usual;
those still out then are abandoned (cancelled: their answers never reach lensforge, so the next run asks again).
A second stop abandons them at once. The journal is compacted and `run` returns its stats with `signal` set.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from captioning.checks import words
from captioning.client import NotSent, Sender, make_client, resolve_api_key
from captioning.config import CaptionConfig
from captioning.images import Image, load_images
from captioning.journal import Journal
from captioning.ledger import price_for, reservation_usd
from captioning.presets import Preset
from captioning.request import build_request, error_rows, parse_response, variant_groups
from captioning.schema import STATUS_OK

UNREADABLE = "unreadable_image"  # the error of a key whose image could not be read: nothing was sent


class Stopped(KeyboardInterrupt):
    """A run stopped by SIGTERM / SIGINT after saving every answer. A KeyboardInterrupt, so a caller that does not
    know it stops as on Ctrl-C (cli.main: exit 130); `lensforge caption` exits 128 + signum (SIGTERM 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class Stats:
    """Final outcome of each (key, variant) of this run, plus what it cost."""

    outcomes: Counter = field(default_factory=Counter)  # (variant, status) → pairs
    words: Counter = field(default_factory=Counter)  # variant → words over ok captions
    requests: int = 0
    cost_usd: float = 0.0
    stopped: str | None = None  # "budget" when the budget stopped the run early
    transport: Counter = field(default_factory=Counter)
    rows: int = 0  # answer rows journaled this run (all of them on disk)
    abandoned: int = 0  # requests still in flight when a stop's drain ended
    signal: int | None = None  # the signal that stopped the run
    nodes: Counter = field(default_factory=Counter)  # Ray node id → (key, variant) pairs finished there (Ray only)

    def merge(self, other: dict) -> None:
        self.outcomes.update(other["outcomes"])
        self.words.update(other["words"])
        self.requests += other["requests"]
        self.cost_usd += other["cost_usd"]
        self.stopped = self.stopped or other["stopped"]
        self.transport.update(other["transport"])
        self.rows += other["rows"]
        self.abandoned += other["abandoned"]
        self.signal = self.signal or other["signal"]
        self.nodes.update(other.get("nodes", {}))

    def as_dict(self) -> dict:
        return {"outcomes": dict(self.outcomes), "words": dict(self.words), "requests": self.requests,
                "cost_usd": self.cost_usd, "stopped": self.stopped, "transport": dict(self.transport),
                "rows": self.rows, "abandoned": self.abandoned, "signal": self.signal, "nodes": dict(self.nodes)}


def read_images(data, chunk: list[dict], cfg: CaptionConfig) -> dict[str, Image | str]:
    """load_images, except that a shard that cannot be read at all (truncated, not a tar) makes its keys unreadable
    instead of stopping the job."""
    try:
        return load_images(data, chunk, cfg)
    except Exception:  # noqa: BLE001 - narrowed below, shard by shard
        out: dict[str, Image | str] = {}
        for shard in dict.fromkeys(r["shard"] for r in chunk):
            group = [r for r in chunk if r["shard"] == shard]
            try:
                out.update(load_images(data, group, cfg))
            except Exception as err:  # noqa: BLE001 - tarfile, OSError, ...: the row records why
                out.update({r["key"]: f"unreadable shard {shard}: {type(err).__name__}: {err}"[:300] for r in group})
        return out


async def prefetch(data, chunks: Iterable[list[dict]], cfg: CaptionConfig):
    """(chunk, images) pairs; the next chunk is taken (plan.part_chunks plans a part when it reaches one) and its
    images read and resized in a thread meanwhile. Only that thread advances `chunks`, one step at a time."""
    chunks = iter(chunks)

    def load() -> tuple[list[dict], dict] | None:
        chunk = next(chunks, None)
        return None if chunk is None else (chunk, read_images(data, chunk, cfg))

    nxt = asyncio.create_task(asyncio.to_thread(load))
    try:
        while (got := await nxt) is not None:
            nxt = asyncio.create_task(asyncio.to_thread(load))
            yield got
    finally:
        nxt.cancel()


class Worker:
    """One event loop's share of the job: requests under a rate controller, answers to its own journal and parts."""

    def __init__(self, data, cfg: CaptionConfig, presets: dict[str, Preset], budget, run_id: str, worker: int,
                 api_key: str | None = None):
        self.data, self.cfg, self.presets, self.budget = data, cfg, presets, budget
        self.journal = Journal(data, run_id, worker, cfg.flush_rows)
        self.stats = Stats()
        self.price = price_for(cfg.model or "", cfg)
        self.slots = asyncio.Semaphore(cfg.concurrency)  # tasks alive (waiting, retrying or sending)
        self.api_key = api_key or resolve_api_key(cfg)
        self.sender: Sender | None = None
        self.tasks: set[asyncio.Task] = set()
        self.failures: list[BaseException] = []
        self.in_flight = 0  # requests started and not answered
        self._stop, self._abort = asyncio.Event(), asyncio.Event()

    def request_stop(self, signum: int, abort: bool | None = None) -> None:
        """Stop starting and sending; `abort` (default: when already stopping) abandons what is in flight at once.
        Call it from the event loop's thread (a loop signal handler, or call_soon_threadsafe)."""
        abort = self._stop.is_set() if abort is None else abort
        self.stats.signal = self.stats.signal or signum
        self._stop.set()
        if abort:
            self._abort.set()
        if self.sender is not None:
            self.sender.stop()

    def record(self, rows: list[dict], final: bool) -> None:
        """Journal attempt rows (on disk when this returns); count the (key, variant) outcomes final for this run."""
        self.journal.append(rows)
        self.stats.rows += len(rows)
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
            stopping = self._stop.is_set()
            if stopping or self.stats.stopped or not self.budget.reserve(sum(reserved)):
                # No re-ask: the last attempt's row stands, the next run asks again.
                self.stats.stopped = self.stats.stopped if stopping else "budget"
                self.stats.outcomes.update((v, "error") for v in failed)
                self.budget.count("error", len(failed))
                return

    async def ask_one(self, key: str, group: list[str], body: dict, reserved: float, final: bool) -> list[str]:
        """One request → rows; returns the variants worth asking again (failed checks, malformed bodies)."""
        self.stats.requests += 1
        self.in_flight += 1
        try:
            answer = await self.sender.send(body, key)
        except NotSent:  # stopping: nothing went out, nothing to write
            self.stats.requests -= 1
            self.budget.settle(reserved, 0.0)
            return []
        finally:
            self.in_flight -= 1
        if answer.body is not None:
            rows = parse_response(answer.body, [self.presets[v] for v in group], self.cfg, key=key)
        else:
            rows = error_rows(key, group, self.cfg, answer.error)
        for r in rows:
            r["latency_s"] = round(answer.latency_s, 4)
        self.budget.settle(reserved, sum(r["cost_usd"] for r in rows))
        retryable = answer.body is not None or (answer.error or "").startswith("malformed")
        failed = [r["variant"] for r in rows if r["status"] != STATUS_OK] if retryable else []
        self.record(rows, final=final or not failed)  # on disk before this task ends and frees its slot
        return failed

    async def launch(self, item: dict, image: Image | str) -> bool:
        """Reserve budget for one key's requests and start them; False once the budget is spent."""
        if isinstance(image, str):  # unreadable image: an error row per variant, nothing sent, its slot free again
            self.record(error_rows(item["key"], item["variants"], self.cfg, f"{UNREADABLE}: {image}"), final=True)
            self.slots.release()
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

    async def feed(self, chunks: Iterable[list[dict]]) -> None:
        async for chunk, images in prefetch(self.data, chunks, self.cfg):
            if not await self.launch_chunk(chunk, images):
                break
        while self.tasks:
            await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
            self.raise_failures()
        self.raise_failures()

    async def run(self, chunks: Iterable[list[dict]]) -> dict:
        """Request every item of `chunks` (lists of pending-work items); returns the stats (Stats.as_dict)."""
        client = make_client(self.cfg, self.api_key)
        self.sender = Sender(client, self.cfg, self.api_key)
        if self._stop.is_set():  # stopped before the loop ran (a Ray driver's early stop)
            self.sender.stop()
        ticker = asyncio.create_task(self.journal.ticker(self.cfg.flush_s))
        try:
            async with client:
                await self.feed_until_stopped(chunks)
        finally:
            ticker.cancel()
            self.journal.close()
            self.budget.flush(final=True)
        self.stats.transport.update(self.sender.counts)
        return self.stats.as_dict()

    async def feed_until_stopped(self, chunks: Iterable[list[dict]]) -> None:
        feed = asyncio.create_task(self.feed(chunks))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({feed, stop}, return_when=asyncio.FIRST_COMPLETED)
            if feed.done():
                feed.result()  # a fatal error raises here
            else:
                feed.cancel()  # no new key; the tasks already started are not the feed's and keep running
                await asyncio.gather(feed, return_exceptions=True)
                await self.drain()
        finally:  # on a fatal error, a kill or after the drain: stop what is in flight before closing the client
            stop.cancel()
            feed.cancel()
            pending = list(self.tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def drain(self) -> None:
        """Up to `drain_s` for the requests in flight (their answers are journaled as they come), or until abort."""
        abort = asyncio.create_task(self._abort.wait())
        deadline = time.monotonic() + self.cfg.drain_s
        try:
            while self.tasks and not abort.done() and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait({*self.tasks, abort}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
        self.stats.abandoned = self.in_flight


async def run_with_signals(worker: Worker, chunks: Iterable[list[dict]]) -> dict:
    """worker.run(chunks) with SIGTERM and SIGINT turned into worker.request_stop while it runs (main thread only:
    elsewhere signals cannot be caught); the previous handlers come back afterwards."""
    loop, saved = asyncio.get_running_loop(), {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            saved[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, worker.request_stop, sig)
    try:
        return await worker.run(chunks)
    finally:
        for sig, handler in saved.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
