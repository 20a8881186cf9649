"""Curation throughput against its peer, measured in one run on this machine.

    .venv/bin/python bench/curate.py [--n 2000] [--size 256] [--repeats 1] [--out bench-out/curate]
    .venv/bin/python bench/curate.py --n 100000 --size 64      # issue 15's 100 k small images (~15 min)

Serves N size² JPEG scenes over loopback, then:
  - raw img2dataset CLI (its default multiprocessing distributor, same shard size, threads and no re-encoding):
    images/s over the whole command;
  - `lensforge curate`: images/s of its input and download stages (the list cut into shards, img2dataset on Ray
    behind the URL guard), from the run's DATA/reports/timings.json, and the ratio to the raw CLI (goal >= 0.9);
  - pixel filters + dedup: images/s per core.
Repeats alternate the two downloaders; medians are printed. Shared, noisy machines: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARD_SIZE, THREADS, PROCESSES = 500, 32, 2
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/curate.py`
from bench.report import emit, row  # noqa: E402
from curation.shard_filter import read_markers  # noqa: E402

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def raw_img2dataset(urls: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [str(BIN / "img2dataset"), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
         "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
         "--processes_count", str(PROCESSES), "--thread_count", str(THREADS),
         "--number_sample_per_shard", str(SHARD_SIZE), "--disable_all_reencoding", "True",
         "--extract_exif", "False", "--compute_hash", "sha256"],
        check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return ok / seconds


def lensforge_curate(urls: Path, out: Path, config: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(BIN / "lensforge"), "curate", "--urls", str(urls), "--out", str(out), "--config",
                    str(config)], check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timings = json.loads((out / "reports" / "timings.json").read_text())
    shards = read_markers(out / "filtered")
    cores = min(len(shards), os.cpu_count() or 1)
    secs = timings["seconds"]
    n = timings["downloaded"]
    return {
        "download_ips": n / (secs["download"] + secs.get("input", 0)),  # reading and sharding the list, as raw
        "filter_dedup_ips_per_core": n / ((secs["filter"] + secs["dedup"]) * cores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="side of the square scenes, pixels")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench-out/curate")
    args = parser.parse_args()

    from scenes import render_dataset, start_server
    from scenes.config import ScenesConfig

    out = Path(args.out)
    scenes_dir = out / "scenes"
    scenes_dir.mkdir(parents=True, exist_ok=True)
    server, base_url = start_server(scenes_dir, host="127.0.0.1", port=0)
    urls = render_dataset(ScenesConfig(n=args.n, size=args.size, faults=0.0, word_prob=0.0, base_url=base_url),
                          scenes_dir)
    config = out / "curate.yaml"
    config.write_text(yaml.safe_dump({"curate": {
        "allow_hosts": ["127.0.0.1"], "min_area": 0, "min_blur": 0, "min_entropy": 0, "min_luminance": 0,
        "download": {"shard_size": SHARD_SIZE, "threads": THREADS, "processes": PROCESSES},
    }}))

    raw, ours, filt = [], [], []
    for _ in range(args.repeats):
        raw.append(raw_img2dataset(urls, out / "raw"))
        result = lensforge_curate(urls, out / "data", config)
        ours.append(result["download_ips"])
        filt.append(result["filter_dedup_ips_per_core"])
    server.shutdown()

    med = statistics.median
    rows = [
        ("raw img2dataset CLI, images/s", f"{med(raw):.1f}", ""),
        ("lensforge curate download stage, images/s", f"{med(ours):.1f}", f"{med(ours) / med(raw):.2f}x raw (goal >= 0.9)"),
        ("pixel filters + dedup, images/s per core", f"{med(filt):.1f}", ""),
    ]
    print(f"\ncuration, {args.n} x {args.size}² JPEG over loopback, {os.cpu_count()} cores, median of {args.repeats}")
    for name, value, note in rows:
        print(f"  {name:<45} {value:>8}  {note}")
    what = f"download stage (img2dataset on Ray + URL guard), {args.n} × {args.size}² JPEG over loopback"
    emit([row("curate", what,
              med(ours), "images/s", peer=med(raw), peer_name="raw img2dataset CLI", goal=">= 0.9"),
          row("curate", "pixel filters + dedup", med(filt), "images/s per core")])


if __name__ == "__main__":
    main()
