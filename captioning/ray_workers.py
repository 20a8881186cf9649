"""`lensforge caption --workers N`: the manifest's parts dealt over N Ray actors (part i → actor i % N), actor i
on the cluster's node i % nodes, each planning its own parts as it reaches them (captioning/plan.py) and running
its own event loop (captioning/worker.py's Worker), journal and Parquet parts, all sharing one budget in a
LedgerActor.

    summaries = ray_summaries(data, cfg, presets, parts)    # Ray tasks over slices of parts: [{part, images, pairs}]
    stats = run_ray(data, cfg, presets, parts_with_work, pairs, run_id, spent)   # stats["nodes"]: node → pairs

The driver holds the parts and their summaries, never a row per key. It shows one progress bar from the ledger
actor's counts; the first fatal error (401, unknown model) of any worker is raised as is, and every actor is
killed. SIGTERM / SIGINT in the driver are forwarded to every actor's loop (`RayWorker.stop`), which drains as one
worker does; a second signal abandons at once. Whatever happens to the driver, each worker journals every answer
as it arrives, so even a SIGKILL of the whole job loses none.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from captioning.client import resolve_api_key
from captioning.config import CaptionConfig
from captioning.plan import deal, part_chunks, part_summaries
from captioning.presets import Preset
from captioning.request import request_model
from captioning.worker import Stats, Worker
from common.progress import progress_bar

ACTOR_GRACE_S = 15.0  # after a stop's drain: time for the actors to compact their journals and return
TASKS_PER_WORKER = 4  # summary tasks per --workers: a few each, so one slow slice does not hold up the rest


class RayWorker:
    """A Ray actor running one Worker's event loop, in one of its two threads (max_concurrency=2); the other takes
    `stop` while `run` runs. The key comes as an argument, never through the (logged) runtime environment. The
    actor plans its parts itself, one at a time, so no per-key list crosses the object store."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Worker | None = None
        self._stop: tuple[int, bool] | None = None  # a stop that came before the loop ran

    def run(self, data, cfg, presets, parts, run_id, worker, ledger, api_key) -> dict:
        """Stats.as_dict of this actor's share, with "nodes": {this Ray node's id: pairs finished}."""
        import ray

        from captioning.ledger import LeasedBudget

        budget = LeasedBudget(ledger, max(1, cfg.concurrency // 4))
        w = Worker(data, cfg, presets, budget, run_id, worker, api_key=api_key)

        async def main():
            with self._lock:
                self._loop, self._worker = asyncio.get_running_loop(), w
                if self._stop is not None:
                    w.request_stop(*self._stop)

            async def report():  # progress and spent dollars to the ledger actor, for the driver's bar
                while True:
                    await asyncio.sleep(0.5)
                    budget.flush()
            reporter = asyncio.create_task(report())
            try:
                return await w.run(part_chunks(data, parts, presets, request_model(cfg), cfg.chunk_size))
            finally:
                reporter.cancel()
        stats = asyncio.run(main())
        stats["nodes"] = {ray.get_runtime_context().get_node_id(): sum(stats["outcomes"].values())}
        return stats

    def stop(self, signum: int, abort: bool) -> None:
        """The driver's signal, into the running loop (or kept for it). Repeating a call changes nothing."""
        with self._lock:
            self._stop = (signum, abort)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._worker.request_stop, signum, abort)


def proxy_env() -> dict[str, str]:
    """The driver's proxy settings: init_ray points Ray's own processes at a closed loopback proxy, which the
    workers would otherwise inherit and so never reach api.openai.com."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")
    return {n: os.environ.get(n, "") for n in names}


class DriverSignals:
    """SIGTERM / SIGINT in the driver, counted here (watch_ray forwards them) instead of exiting: ray.init's own
    SIGTERM handler exits at once. The previous handlers come back on exit. Main thread only."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0  # signals received
        self.sent = 0  # ... and forwarded
        self._saved: dict = {}

    def __call__(self, signum, frame) -> None:
        self.signum, self.count = self.signum or signum, self.count + 1

    def __enter__(self) -> DriverSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ray_summaries(data, cfg: CaptionConfig, presets: dict[str, Preset], parts: list) -> list[dict]:
    """`plan.part_summary` of every part, in the parts' order, from Ray tasks spread over the cluster: each task
    plans a contiguous slice of the parts (TASKS_PER_WORKER per worker), so the caption parts' key ranges are read
    once a slice rather than once a part."""
    import ray

    from common.ray_runtime import init_ray

    init_ray(cfg.ray_address)
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(part_summaries)
    n = min(len(parts), cfg.workers * TASKS_PER_WORKER)
    size = -(-len(parts) // n) if n else 1
    slices = [[str(p) for p in parts[i:i + size]] for i in range(0, len(parts), size)]
    refs = [task.remote(str(data), presets, request_model(cfg), part_slice) for part_slice in slices]
    return [summary for got in ray.get(refs) for summary in got]


def run_ray(data, cfg: CaptionConfig, presets: dict[str, Preset], parts: list[str], pairs: int, run_id: str,
            spent: float = 0.0) -> dict:
    """`parts` (those with pending work; `pairs` in all, for the bar) dealt over min(workers, parts) actors, actor
    i on node i % nodes (`node_strategies`), so `--workers N` lands on several nodes; returns the merged stats."""
    import ray

    from captioning.ledger import LedgerActor
    from common.ray_runtime import init_ray, node_strategies

    api_key = resolve_api_key(cfg)
    env = proxy_env()
    init_ray(cfg.ray_address)
    ledger = ray.remote(num_cpus=0)(LedgerActor).remote(cfg.max_cost_usd, spent)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=2, runtime_env={"env_vars": env})(RayWorker)
    shares = deal([str(p) for p in parts], min(cfg.workers, max(1, len(parts))))
    actors = [actor_cls.options(scheduling_strategy=s).remote() for s in node_strategies(len(shares))]
    stats = Stats()
    with DriverSignals() as signals:
        refs = [a.run.remote(str(data), cfg, presets, share, run_id, i, ledger, api_key)
                for i, (a, share) in enumerate(zip(actors, shares))]
        try:
            watch_ray(refs, actors, ledger, pairs, stats, spent, signals, cfg.drain_s)
        finally:
            for a in actors:
                ray.kill(a)
    stats.signal = stats.signal or signals.signum
    return stats.as_dict()


def watch_ray(refs: list, actors: list, ledger, pairs: int, stats: Stats, prior: float, signals: DriverSignals,
              drain_s: float) -> None:
    """Driver-side progress from the ledger actor; the first fatal worker error is raised as is; signals are
    forwarded to the actors, which are waited for up to their drain (plus ACTOR_GRACE_S)."""
    import ray

    deadline = None
    with progress_bar(total=pairs, desc="caption", unit="caption", dynamic_ncols=True) as bar:
        while refs:
            if signals.count > signals.sent:
                abort = signals.count > 1
                for a in actors:
                    a.stop.remote(signals.signum, abort)
                signals.sent = signals.count
                deadline = time.monotonic() + (0.0 if abort else drain_s) + ACTOR_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                return  # the actors are killed; their journals hold every answer they got
            ready, refs = ray.wait(refs, num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    stats.merge(ray.get(ref))
                except ray.exceptions.RayTaskError as err:
                    raise err.cause if isinstance(err.cause, Exception) else err from None
            state = ray.get(ledger.state.remote())
            bar.n = sum(state["done"].values())
            done = " ".join(f"{k}={v}" for k, v in state["done"].items())
            bar.set_postfix_str(f"${state['spent'] - prior:.4f} {done}")
