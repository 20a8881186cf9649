"""How the data stages' drivers scale with rows: wall time and the driver process's peak RSS per stage, at several
row counts, on synthetic state written in the real on-disk formats (issue 15's measurements).

    .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--stages guard,dedup,caption,precompute]
                                    [--out bench-out/scale] [--timeout-s 1800]

Stages, each run alone in its own process (its peak RSS is that process's ru_maxrss, from os.wait4):
  guard       `lensforge curate` on N URLs that the URL guard refuses statically (loopback URLs, another host
              allowed): reading, keying, guarding, the manifest and reports, with nothing fetched.
  dedup       dedup + manifest over N filtered rows (curation/pipeline.py: read_url_list, read_filtered, dedup,
              build_manifest, write_manifest): the post-download driver work of `lensforge curate`.
  caption     caption planning: `pending_work` over the manifest's kept rows, half of them captioned already.
  precompute  precompute planning: caption_sources, read_candidates, locate_images, assign_buckets, assign_shards,
              shard_hashes over the captioned rows.
The state per size: an N-row URL list; download tars of 10,000 members (one 16² JPEG's bytes each); filtered parts
(10 % rejected by a filter, 1 % exact and 1 % perceptual duplicates, 192-byte thumbnails, no CLIP embeddings, as
with `models.clip_model: null`); the dedup stage's manifest; dense captions of ~100 words for half the kept rows.
Printed per stage and size: seconds, µs per row, peak RSS in MB, and the ratios the issue's goals are stated in
(RSS at the largest size over the one below it; time per row over the smallest size's). Time alone on the machine:
two torch or Ray processes on 2 cores slow each other many times over.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/scale.py`
from bench.report import emit, row  # noqa: E402

STAGES = ("guard", "dedup", "caption", "precompute")
SHARD = 10_000  # rows per download shard (curate.download.shard_size's default)
MODEL = "gpt-4.1"
WORDS = ("red", "blue", "green", "circle", "square", "triangle", "small", "large", "left", "right", "top",
         "bottom", "over", "under", "a", "the", "with", "and", "on", "background")


# --- the synthetic state ----------------------------------------------------------------------------------------


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_urls(n: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = pa.array([f"http://127.0.0.1:9/img/{i:09d}.jpg" for i in range(n)])
    alts = pa.array([f"a scene number {i}" for i in range(n)])
    pq.write_table(pa.table({"url": urls, "caption": alts}), path)


def write_downloads_and_filtered(n: int, data: Path, seed: int = 0) -> None:
    """DATA/download/{shard}.tar (members `{key}.jpg`) and DATA/filtered/{shard}.parquet in FILTERED_SCHEMA."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.manifest import make_key
    from curation.shard_filter import FILTERED_SCHEMA

    raw, rng = tiny_jpeg(), np.random.default_rng(seed)
    (data / "download").mkdir(parents=True, exist_ok=True)
    (data / "filtered").mkdir(parents=True, exist_ok=True)
    phash = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
    exact = np.array([f"{x:032x}" for x in rng.integers(0, 2**63 - 1, n, dtype=np.int64)], dtype=object)
    dup = rng.random(n)
    source = rng.integers(0, n, n)
    exact[dup < 0.01] = exact[source[dup < 0.01]]  # 1 % exact duplicates of another row
    near = (dup >= 0.01) & (dup < 0.02)
    phash[near] = phash[source[near]] ^ 0b101  # 1 % perceptual: 2 bits off another row's pHash
    rejected = rng.random(n) < 0.10
    thumbs = rng.integers(0, 256, (n, 192), dtype=np.uint8)
    thumbs[near] = thumbs[source[near]]
    for shard_i, start in enumerate(range(0, n, SHARD)):
        shard = f"{shard_i:05d}"
        keys = [make_key(i) for i in range(start, min(n, start + SHARD))]
        with tarfile.open(data / "download" / f"{shard}.tar", "w") as tar:
            for key in keys:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        idx = np.arange(start, start + len(keys))
        rows = {
            "key": keys, "status": ["ok"] * len(keys), "error": [None] * len(keys),
            "width": np.full(len(keys), 512, np.int32), "height": np.full(len(keys), 384, np.int32),
            "sha256": list(exact[idx]), "reject_reason": ["blur" if r else None for r in rejected[idx]],
            "shard": [f"{shard}.tar"] * len(keys), "member": [f"{k}.jpg" for k in keys],
            "exact_hash": list(exact[idx]), "phash": phash[idx],
            "thumb": [t.tobytes() for t in thumbs[idx]], "embedding": [None] * len(keys),
        }
        for col in ("blur", "entropy", "luminance", "clip_score", "aesthetic", "nsfw", "watermark"):
            rows[col] = rng.random(len(keys)).astype(np.float32)
        pq.write_table(pa.table(rows, schema=FILTERED_SCHEMA), data / "filtered" / f"{shard}.parquet")


def write_captions(data: Path, seed: int = 0) -> None:
    """Dense captions (~100 words) by MODEL for every other kept key, in parts of 100,000 rows."""
    from datetime import datetime, timezone

    from captioning.presets import PRESETS
    from captioning.schema import captions_dir, write_part
    from curation.manifest import read_manifest

    kept = read_manifest(data, columns=["key", "keep"]).to_pandas()
    keys = kept.loc[kept["keep"], "key"].tolist()[::2]
    rng, now, prompt = np.random.default_rng(seed), datetime.now(timezone.utc), PRESETS["dense"].prompt_id
    vocab = np.array(WORDS)
    for i, start in enumerate(range(0, len(keys), 100_000)):
        part = keys[start:start + 100_000]
        texts = [" ".join(w) for w in vocab[rng.integers(0, len(vocab), (len(part), 100))]]
        write_part(captions_dir(data) / f"part-bench-{i:05d}.parquet", [
            {"key": k, "variant": "dense", "text": t, "model": MODEL, "prompt_id": prompt, "prompt_tokens": 900,
             "completion_tokens": 140, "cost_usd": 0.002, "latency_s": 1.0, "status": "ok", "created_at": now}
            for k, t in zip(part, texts)])


# --- the stages, each in its own process ------------------------------------------------------------------------


def stage_guard(root: Path) -> dict:
    out = root / "guard"
    cmd = [sys.executable, "-m", "pipelines.cli", "curate", "--urls", str(root / "urls.parquet"), "--out", str(out),
           "--allow-hosts", "127.0.0.2"]  # every URL is on 127.0.0.1: refused before any request
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode not in (0, 2):  # 2: nothing kept, as intended
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return {"rows": int(json.loads((out / "reports" / "funnel.json").read_text())["total"])}


def stage_dedup(root: Path) -> dict:
    from curation.config import CurateConfig
    from curation.inputs import read_url_list
    from curation.pipeline import FILTERED_SCHEMA, build_manifest, dedup, read_filtered, write_manifest

    data, cfg = root / "data", CurateConfig(allow_hosts=["127.0.0.1"])
    inputs, extra = read_url_list(root / "urls.parquet")
    filtered = read_filtered(data, [c for c in FILTERED_SCHEMA.names if c != "embedding"])
    dups = dedup(data, filtered, cfg)
    manifest = build_manifest(inputs, {}, filtered, dups, extra)
    write_manifest(manifest, data)
    return {"rows": len(manifest), "kept": int(manifest["keep"].sum()), "duplicates": len(dups)}


def stage_caption(root: Path) -> dict:
    from captioning.pipeline import pending_work
    from captioning.presets import PRESETS

    items = pending_work(root / "data", {"dense": PRESETS["dense"]}, MODEL)
    return {"pending": len(items)}


def stage_precompute(root: Path) -> dict:
    from training.buckets import BucketTable
    from training.precompute_plan import (assign_buckets, assign_shards, caption_sources, locate_images,
                                          read_candidates, shard_hashes)

    data, variants = root / "data", ["dense"]
    sources = caption_sources(data, variants, MODEL)
    rows, skipped = read_candidates(data, variants, sources)
    rows, errors = locate_images(data, rows)
    rows, _ = assign_buckets(rows, BucketTable([256, 512], ["1:1", "4:3", "3:4"], 16))
    rows = assign_shards(rows, 1000)
    return {"candidates": len(rows), "shards": len(shard_hashes(rows, variants)), "errors": len(errors)}


RUNNERS = {"guard": stage_guard, "dedup": stage_dedup, "caption": stage_caption, "precompute": stage_precompute}


def measure(stage: str, root: Path, timeout_s: float) -> dict:
    """Run `stage` on `root` in a child process: wall seconds, its peak RSS (MB) and what it returned."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage, "--root", str(root)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "LENSFORGE_PROGRESS_S": "600"})
    deadline = started + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return {"seconds": None, "rss_mb": usage.ru_maxrss / 1024, "result": f"timed out after {timeout_s:.0f} s"}
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{stage} failed: {err[-2000:]}")
    # ru_maxrss (KiB on Linux) covers the stage process and the children it waited for (the guard's CLI process)
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "result": json.loads(out.splitlines()[-1])}


def build_state(n: int, root: Path) -> None:
    if (root / "state.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_urls(n, root / "urls.parquet")
    write_downloads_and_filtered(n, root / "data")
    (root / "state.json").write_text(json.dumps({"rows": n, "seconds": round(time.perf_counter() - started, 1)}))


def main(argv: list[str] | None = None) -> dict[str, dict[int, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", default="bench-out/scale")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--label", default="", help="a name for this code version in the printed table")
    parser.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_stage:
        print(json.dumps(RUNNERS[args.run_stage](Path(args.root))))
        return {}
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = [s.strip() for s in args.stages.split(",")]
    results: dict[str, dict[int, dict]] = {s: {} for s in stages}
    for n in sizes:
        root = Path(args.out) / f"n{n}"
        build_state(n, root)
        for stage in stages:
            if stage == "caption" and not (root / "data" / "captions").is_dir():
                write_captions(root / "data")
            results[stage][n] = r = measure(stage, root, args.timeout_s)
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f} s"
            print(f"scale {args.label}: {stage:<10} n={n:>9,}: {secs:>9}, peak RSS {r['rss_mb']:,.0f} MB; "
                  f"{r['result']}", flush=True)
    rows = []
    print(f"\nscale {args.label}: stage, rows, seconds, µs/row, driver peak RSS MB")
    for stage, by_n in results.items():
        first = min(by_n)
        for n, r in sorted(by_n.items()):
            us = None if r["seconds"] is None else r["seconds"] / n * 1e6
            base = by_n[first]["seconds"] / first * 1e6 if by_n[first]["seconds"] else None
            print(f"  {stage:<10} {n:>9,} {r['seconds'] or float('nan'):>9.1f} {us or float('nan'):>9.1f} "
                  f"{r['rss_mb']:>9,.0f}" + (f"  time/row {us / base:.2f}× of n={first:,}" if us and base else ""))
            rows.append(row("scale", f"{stage} driver peak RSS at {n:,} rows{' ' + args.label if args.label else ''}",
                            r["rss_mb"], "MB"))
            if us:
                rows.append(row("scale", f"{stage} µs per row at {n:,} rows{' ' + args.label if args.label else ''}",
                                us, "µs", peer=base, peer_name=f"µs per row at {first:,}", goal="<= 1.3"))
    emit(rows)
    return results


if __name__ == "__main__":
    main()
