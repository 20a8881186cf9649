"""`lensforge caption --workers N`: the pending keys split over N Ray actors, each running its own event loop
(captioning/pipeline.py's Worker) and writing its own Parquet parts, all sharing one budget in a LedgerActor.

The driver shows one progress bar from the ledger actor's counts; the first fatal error (401, unknown model) of any
worker is raised as is, and every actor is killed.
"""

from __future__ import annotations

import asyncio
import os

from tqdm import tqdm

from captioning.client import resolve_api_key
from captioning.config import CaptionConfig
from captioning.pipeline import Stats, Worker
from captioning.presets import Preset


class RayWorker:
    """A Ray actor running one Worker's event loop. The key comes as an argument, never through the (logged)
    runtime environment."""

    def run(self, data, cfg, presets, items, run_id, worker, ledger, api_key) -> dict:
        from captioning.ledger import LeasedBudget

        budget = LeasedBudget(ledger, max(1, cfg.concurrency // 4))
        w = Worker(data, cfg, presets, budget, run_id, worker, api_key=api_key)

        async def main():
            async def report():  # progress and spent dollars to the ledger actor, for the driver's bar
                while True:
                    await asyncio.sleep(0.5)
                    budget.flush()
            reporter = asyncio.create_task(report())
            try:
                return await w.run(items)
            finally:
                reporter.cancel()
        return asyncio.run(main())


def proxy_env() -> dict[str, str]:
    """The driver's proxy settings: init_ray points Ray's own processes at a closed loopback proxy, which the
    workers would otherwise inherit and so never reach api.openai.com."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")
    return {n: os.environ.get(n, "") for n in names}


def run_ray(data, cfg: CaptionConfig, presets: dict[str, Preset], items: list[dict], run_id: str,
            spent: float = 0.0) -> dict:
    import ray

    from captioning.ledger import LedgerActor
    from curation.ray_runtime import init_ray

    api_key = resolve_api_key(cfg)
    env = proxy_env()
    init_ray(cfg.ray_address)
    ledger = ray.remote(num_cpus=0)(LedgerActor).remote(cfg.max_cost_usd, spent)
    actor_cls = ray.remote(num_cpus=0, runtime_env={"env_vars": env})(RayWorker)
    n = min(cfg.workers, max(1, len(items)))
    actors = [actor_cls.remote() for _ in range(n)]
    refs = [a.run.remote(str(data), cfg, presets, items[i::n], run_id, i, ledger, api_key)
            for i, a in enumerate(actors)]
    stats = Stats()
    try:
        watch_ray(refs, ledger, sum(len(i["variants"]) for i in items), stats, spent)
    finally:
        for a in actors:
            ray.kill(a)
    return stats.as_dict()


def watch_ray(refs: list, ledger, pairs: int, stats: Stats, prior: float) -> None:
    """Driver-side progress from the ledger actor; the first fatal worker error is raised as is."""
    import ray

    with tqdm(total=pairs, desc="caption", unit="caption", dynamic_ncols=True) as bar:
        while refs:
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
