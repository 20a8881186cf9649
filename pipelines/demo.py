"""The embedded default, offline: render synthetic scenes with web faults → serve them on loopback → curate →
caption them densely through the local OpenAI-compatible endpoint (which knows only the synthetic scenes) →
precompute 32² pixel latents and MiniLM text features → train the `tiny` preset → sample held-out prompts → score
their adherence with `scenes/` → DATA/report.html.

    lensforge demo --out demo-out          (what `make demo` runs; rerun it to finish an interrupted demo)

Settings: configs/demo.yaml, a pipeline file like any other: `lensforge run configs/demo.yaml` runs the same stages
on your own URL list, and every stage command accepts it with --config, so each step can be rerun by hand.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd

from pipelines.config import load_section, save_resolved
from pipelines.run import Services, run_pipeline
from pipelines.stage_cache import is_done, mark_done, stage_key

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
PLACEHOLDER_BASE_URL = "http://127.0.0.1:1"  # rewritten to the live server's URL whenever curate runs


def render_scenes(scenes_dir: Path, config: str, overrides: list[str]) -> tuple[str, str]:
    """Render the scene web once per scenes config; returns that config's key (it stands for the URL list) and its
    scene world (the captioner must parse in it)."""
    from scenes import render_dataset

    cfg = load_section("scenes", config, overrides, base_url=PLACEHOLDER_BASE_URL)
    key = stage_key("scenes", cfg)
    if is_done(scenes_dir, "scenes", key):
        return key, cfg.world
    began = time.time()
    save_resolved(cfg, "scenes", scenes_dir)
    render_dataset(cfg, scenes_dir)
    mark_done(scenes_dir, "scenes", key, {"n": cfg.n}, time.time() - began)
    print(f"demo: {cfg.n} scenes rendered into {scenes_dir} in {time.time() - began:.0f} s")
    return key, cfg.world


def rebase_urls(urls: Path, base_url: str) -> None:
    """Point the URL list at `base_url` (the scenes server listens on a fresh loopback port each time)."""
    table = pd.read_parquet(urls)
    table["url"] = base_url + table["url"].str.replace(r"^https?://[^/]+", "", regex=True)
    table.to_parquet(urls, index=False)


@contextlib.contextmanager
def scene_web(scenes_dir: Path):
    from scenes import start_server

    server, base_url = start_server(scenes_dir, host="127.0.0.1", port=0)
    try:
        rebase_urls(scenes_dir / "urls.parquet", base_url)
        print(f"demo: scenes served at {base_url}")
        yield base_url
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def scene_captioner(world: str = "basic"):
    """The local endpoint, parsing and describing the scene world the demo rendered (`scenes.world`)."""
    from captioning.endpoint import start_endpoint

    endpoint, url = start_endpoint(host="127.0.0.1", port=0, world=world)
    try:
        yield url
    finally:
        endpoint.stop()


def run_demo(out: str | Path, config: str | Path | None = None, overrides: list[str] | None = None,
             start: str | None = None, stop: str | None = None) -> Path:
    out = Path(out)
    config = str(config or DEMO_CONFIG)
    scenes_dir = out / "scenes"
    began = time.time()
    urls_key, world = render_scenes(scenes_dir, config, overrides or [])
    overrides = [f"run.urls={scenes_dir / 'urls.parquet'}", *(overrides or [])]
    services = Services(web=lambda: scene_web(scenes_dir), captioner=lambda: scene_captioner(world))
    plan = run_pipeline(config, overrides, out=str(out), start=start, stop=stop, services=services,
                        urls_key=urls_key)
    print(f"\ndemo finished in {time.time() - began:.0f} s")
    print(f"  report:      {plan.report}")
    print(f"  data:        {plan.data} (manifest/, captions/, shards/, reports/)")
    print(f"  checkpoints: {plan.train_dir / 'checkpoints'}")
    print("next:\n"
          "  your own URLs:      lensforge run my-pipeline.yaml --set run.urls=my_urls.parquet   "
          "(start from configs/demo.yaml)\n"
          "  a real captioner:   lensforge caption --data my-data --model gpt-4.1-mini --dry-run   "
          "(then configs/lens-800m-style.yaml or configs/vllm-captioner.yaml)\n"
          f"  samples:            lensforge generate 'A large red circle in the center.' --run {plan.train_dir} "
          "--out samples\n"
          "  a GPU:              torchrun --nproc-per-node 8 -m pipelines.cli train --data DATA --out RUN "
          "--preset small   (see README: Training)\n"
          "  check your setup:   lensforge doctor --config my-pipeline.yaml")
    return plan.report
