"""Precompute throughput against the bare encoders, and bytes stored per sample, measured in one run.

    .venv/bin/python bench/precompute.py [--n 512] [--size 256] [--out bench-out/precompute]

Builds DATA with N rendered scenes (JPEG, size²) and dense scene descriptions as captions, then:
  - `precompute` (Ray Data: decode/resize tasks → one encoder actor with `cpus_per_actor` torch threads → shard
    writing on the driver): samples/s from the first encoded batch to the last shard (actor start-up excluded);
  - the raw forward: the same codec and text encoder, in this process with the same torch threads, over the same
    batches already decoded and resized: samples/s of codec.encode + text_encoder.encode alone;
  - ratio (goal >= 0.85: decoding, resizing and writing hidden behind the encoders);
  - bytes per sample stored (index.parquet) versus the same samples padded to 512 tokens in float32.
On a CPU machine the encoders and the decode tasks share cores: the encoder actor holds `cpus_per_actor` of them,
decoding gets the rest. Shared, noisy machines: read the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from captioning.presets import PRESETS
from captioning.schema import CAPTIONS_SCHEMA
from curation.manifest import MANIFEST_SCHEMA, make_key
from scenes import describe, random_scene, render
from training.precompute import precompute
from training.precompute_config import PrecomputeConfig
from training.precompute import table_for
from training.precompute_plan import assign_buckets, assign_shards, locate_images, read_candidates
from training.precompute_workers import decode_batch, load_encoders
from training.shard_format import read_index

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/precompute.py`
from bench.report import emit, row  # noqa: E402


def build_data(data: Path, n: int, size: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for sub in ("download", "manifest", "captions"):
        (data / sub).mkdir(parents=True)
    manifest, captions = [], []
    now = datetime.now(timezone.utc)
    with tarfile.open(data / "download" / "00000.tar", "w") as tar:
        for i in range(n):
            key, scene = make_key(i), random_scene(rng)
            buf = io.BytesIO()
            render(scene, size=size).save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            manifest.append({"key": key, "status": "ok", "width": size, "height": size, "keep": True,
                             "shard": "00000.tar", "member": f"{key}.jpg", "alt_text": ""})
            captions.append({"key": key, "variant": "dense", "text": describe(scene, "dense"), "status": "ok",
                             "model": "scene-describer", "prompt_id": PRESETS["dense"].prompt_id, "created_at": now})
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), data / "manifest" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(captions, schema=CAPTIONS_SCHEMA), data / "captions" / "part-00000.parquet")


def raw_forward(data: Path, cfg: PrecomputeConfig, table) -> float:
    """samples/s of codec.encode + text.encode over precompute's own batches, pre-decoded."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
    rows, _ = read_candidates(data, cfg.variants)
    rows, _ = locate_images(data, rows)
    rows, _ = assign_buckets(rows, table)
    rows = assign_shards(rows, cfg.shard_size)
    decoded = decode_batch(rows, str(data), cfg.max_pixels, cfg.variants)
    codec, text = load_encoders(cfg, "cpu")
    batches = []
    for start in range(0, len(rows), cfg.batch_size):
        part = decoded.iloc[start:start + cfg.batch_size]
        w, h = (int(x) for x in part["bucket"].iat[0].split("x"))
        pixels = np.stack([np.frombuffer(p, np.uint8).reshape(h, w, 3) for p in part["pixels"]])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        batches.append((images, rows["caption.dense"].iloc[start:start + cfg.batch_size].tolist()))
    codec.encode(batches[0][0][:2])
    text.encode(batches[0][1][:2])  # warm-up
    started = time.perf_counter()
    with torch.no_grad():
        for images, captions in batches:
            codec.encode(images)
            text.encode(captions)
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "bench-out" / "precompute"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    build_data(data, args.n, args.size)
    cfg = PrecomputeConfig(codec="pixel", text_encoder="minilm", variants=["dense"], shard_size=128, batch_size=32,
                           buckets={"base_sides": [args.size], "ratios": ["1:1"]})

    set_dir = precompute(data, cfg)
    summary = json.loads((data / "reports" / "precompute.json").read_text())
    ours = summary["seconds"]["steady_samples_per_s"]
    raw = raw_forward(data, cfg, table_for(cfg, 4))
    index = read_index(set_dir)
    stored = index["bytes"].sum() / index["samples"].sum()
    padded = summary["estimate"]["padded_fp32_per_sample"]
    gpt_oss = 512 * 11520 * 4
    print(f"\nprecompute bench: {args.n} images {args.size}², pixel codec + MiniLM (2 layers × 384), "
          f"{int(cfg.cpus_per_actor)} torch thread(s) in both")
    print(f"  raw codec + text-encoder forward: {raw:8.1f} samples/s")
    print(f"  precompute (steady, Ray Data):   {ours:8.1f} samples/s   ratio {ours / raw:.2f}  (goal >= 0.85)")
    print(f"  stored: {stored / 1e3:.1f} KB/sample (estimate {summary['estimate']['per_sample'] / 1e3:.1f} KB) "
          f"vs padded fp32 {padded / 1e3:.1f} KB: ratio {stored / padded:.3f}")
    print(f"  for scale: one GPT-OSS caption padded to 512 tokens in fp32 = {gpt_oss / 1e6:.1f} MB "
          f"(11,520 values/token)")
    emit([row("precompute", f"throughput (decode, resize, encode, write), {args.n} × {args.size}² scenes, pixel "
              "codec + MiniLM", ours, "samples/s", peer=raw, peer_name="raw codec + text-encoder forward, same "
              "batches", goal=">= 0.85"),
          row("precompute", f"bytes stored per sample ({args.size}² pixel latent + text)", stored / 1e3, "KB",
              peer=padded / 1e3, peer_name="text padded to 512 tokens in fp32"),
          row("precompute", "bytes stored per sample against the estimate printed before the run", stored / 1e3,
              "KB", peer=summary["estimate"]["per_sample"] / 1e3, peer_name="printed estimate")])


if __name__ == "__main__":
    main()
