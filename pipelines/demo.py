"""The embedded default, offline: render synthetic scenes with web faults → serve them on loopback → curate →
caption them densely through the local OpenAI-compatible endpoint (which knows only the synthetic scenes) →
precompute 32² pixel latents and MiniLM text features into bucketed training shards.

    lensforge demo --out demo-out          (what `make demo` runs)

Later stages (train, generate) join this flow as they land. Settings: configs/demo.yaml,
which every stage command accepts with --config, so each step can be rerun by hand.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import load_section, save_resolved

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def run_demo(out: str | Path, config: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    from captioning.endpoint import start_endpoint
    from captioning.pipeline import caption
    from curation.pipeline import curate
    from pipelines.commands.caption import report_captions
    from scenes import render_dataset, start_server
    from training.precompute import precompute

    out = Path(out)
    config = Path(config) if config else DEMO_CONFIG
    overrides = overrides or []
    started = time.time()
    scenes_dir, data_dir = out / "scenes", out / "data"
    scenes_dir.mkdir(parents=True, exist_ok=True)

    server, base_url = start_server(scenes_dir, host="127.0.0.1", port=0)
    try:
        scenes_cfg = load_section("scenes", str(config), overrides, base_url=base_url)
        save_resolved(scenes_cfg, "scenes", scenes_dir)
        urls = render_dataset(scenes_cfg, scenes_dir)
        print(f"demo: {scenes_cfg.n} scenes rendered into {scenes_dir}, served at {base_url}")

        curate_cfg = load_section("curate", str(config), overrides)
        save_resolved(curate_cfg, "curate", data_dir)
        curate(urls, data_dir, curate_cfg)
    finally:
        server.shutdown()

    endpoint, endpoint_url = start_endpoint(host="127.0.0.1", port=0)
    try:
        caption_cfg = load_section("caption", str(config), overrides, base_url=endpoint_url)
        save_resolved(caption_cfg, "caption", data_dir / "captions")
        caption(data_dir, caption_cfg)
        report_captions(data_dir)
    finally:
        endpoint.stop()

    precompute(data_dir, load_section("precompute", str(config), overrides))

    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  manifest: {data_dir / 'manifest'}")
    print(f"  captions: {data_dir / 'captions'}")
    print(f"  shards:   {data_dir / 'shards'}")
    reports = ", ".join(str(data_dir / "reports" / name) for name in ("curation.html", "captions.html", "buckets.html"))
    print(f"  reports:  {reports}")
    print("next: your own URL list and a real captioner (any OpenAI-compatible endpoint):\n"
          f"  lensforge curate --urls my_urls.parquet --out my-data --config {config}\n"
          "  lensforge caption --data my-data --model gpt-4.1-mini --dry-run      # estimate tokens and cost first\n"
          "  lensforge caption --data my-data --model gpt-4.1-mini --max-cost-usd 20")
    return data_dir
