"""How the data stages' drivers scale with rows: wall time and the driver process's peak RSS per stage, at several
row counts, on synthetic state written in the real on-disk formats (issue 15's measurements).

    .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--stages guard,input,dedup,caption,precompute]
                                    [--out bench-out/scale] [--timeout-s 1800] [--label after]
    .venv/bin/python bench/scale.py --sizes 10000000 --stages input      # the 10 M-row URL list (URLs only)

Stages, each run alone in its own process; its peak RSS is that process's own (VmHWM: the driver; Ray's GCS,
raylet and workers are other processes, bounded per part):
  guard       `curate()` on N URLs that the URL guard refuses statically (loopback URLs, another host allowed):
              input shards, img2dataset over refused rows (never fetched), filter, dedup, manifest and reports.
  input       the URL list read in record batches, keyed, guarded and cut into input shards (DATA/input/).
  dedup       dedup (map, reduce, groups: curation/dedup_job.py) + the manifest parts over N filtered rows: the
              post-download work of `lensforge curate`.
  caption     caption planning over the manifest's kept rows, half of them captioned already.
  precompute  precompute planning (bucket and shard per row) over the captioned rows.
The state per size: an N-row URL list; input shards; download tars of 10,000 members (one 16² JPEG's bytes each);
filtered parts (10 % rejected by a filter, 1 % exact and 1 % perceptual duplicates, 192-byte thumbnails, no CLIP
embeddings, as with `models.clip_model: null`) and their markers; the dedup stage's manifest; dense captions of
~100 words for half the kept rows. With `--stages input` alone only the URL list is written. Printed per stage and
size: seconds, µs per row, peak RSS in MB, and the ratios the issue's goals are stated in (time per row over the
smallest size's). Time alone on the machine: two torch or Ray processes on 2 cores slow each other many times over.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/scale.py`
from bench.report import emit, row  # noqa: E402

STAGES = ("guard", "input", "dedup", "caption", "precompute")
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
    """DATA/input/{shard}.parquet (curation/input_shards.py), DATA/download/{shard}.tar (members `{key}.jpg`) and
    DATA/filtered/{shard}.parquet in FILTERED_SCHEMA, with the filtered parts' markers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.input_shards import shard_path, write_shard
    from curation.manifest import make_key
    from curation.markers import marker_path, write_marker
    from curation.safety import UrlPolicy
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
        write_marker(marker_path(data / "filtered", shard), {"shard": shard, "config_hash": "bench",
                     "download_stamp": shard}, data / "filtered", [f"{shard}.parquet"])
        inputs = pa.table({"url": [f"http://127.0.0.1:9/img/{k}.jpg" for k in keys],
                           "alt_text": [f"a scene number {int(k)}" for k in keys]})
        write_shard(inputs, start, str(shard_path(data, shard)), UrlPolicy(allow_hosts=("127.0.0.1",)))


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


def _driver_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, the high-water mark of this program's memory since its exec. Not
    ru_maxrss, which Linux carries across exec from the forked copy of the parent (the benchmark holding a
    million-row state would count), nor Ray's processes (GCS, raylet, workers): the driver is what the issue
    bounds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def stage_guard(root: Path) -> dict:
    from curation.config import CurateConfig
    from curation.pipeline import NothingKeptError, curate

    cfg = CurateConfig(allow_hosts=["127.0.0.2"])  # every URL is on 127.0.0.1: refused before any request
    shutil.rmtree(root / "guard", ignore_errors=True)  # a fresh run, not a resumed one
    try:
        summary = curate(root / "urls.parquet", root / "guard", cfg)
    except NothingKeptError:  # nothing kept, as intended
        summary = json.loads((root / "guard" / "reports" / "funnel.json").read_text())
    return {"rows": summary["total"]}


def stage_input(root: Path) -> dict:
    """Read, key, guard and cut the URL list into input shards (DATA/input/), nothing else."""
    from common.ray_runtime import init_ray
    from curation.input_shards import cut, register
    from curation.safety import UrlPolicy

    out = root / "input"
    shutil.rmtree(out, ignore_errors=True)
    init_ray()
    lists = register(out, root / "urls.parquet", SHARD)
    entry = cut(out, root / "urls.parquet", lists[0], UrlPolicy(allow_hosts=("127.0.0.1",)))
    return {"rows": entry.rows, "shards": entry.shards}


def stage_dedup(root: Path) -> dict:
    """Dedup (map, reduce, groups) and the manifest parts over N filtered rows, as `lensforge curate` runs them."""
    from common.ray_runtime import init_ray
    from curation.config import CurateConfig
    from curation.dedup_job import dedup_dir, run_dedup
    from curation.manifest_writer import write_manifest_parts

    data, cfg = root / "data", CurateConfig(allow_hosts=["127.0.0.1"])
    shutil.rmtree(dedup_dir(data), ignore_errors=True)
    shards = sorted(p.stem for p in (data / "filtered").glob("*.parquet"))
    init_ray()
    [dup_file] = run_dedup(data, cfg.dedup, [shards], embeddings=False)
    summary, _ = write_manifest_parts(data, shards, set(shards), {s: dup_file for s in shards})
    return {"rows": summary["total"], "kept": summary["kept"], "duplicates": summary["reject_reasons"]["duplicate"]}


def stage_caption(root: Path) -> dict:
    """Per-part summaries of the pending work, as `lensforge caption` makes them before dealing the parts."""
    from captioning.plan import part_summaries, totals
    from captioning.presets import PRESETS

    pairs, images = totals(part_summaries(root / "data", {"dense": PRESETS["dense"]}, MODEL))
    return {"pending": images, "pairs": pairs}


def stage_precompute(root: Path) -> dict:
    """The plan (candidates, bucket and shard per row: training/precompute_parts.plan) in Ray tasks, no encoding."""
    from common.ray_runtime import init_ray
    from training.precompute_config import PrecomputeConfig
    from training.precompute_parts import plan

    init_ray()
    cfg = PrecomputeConfig(variants=["dense"], caption_model=MODEL, shard_size=1000,
                           buckets={"base_sides": [256, 512], "ratios": ["1:1", "4:3", "3:4"], "multiple": 16})
    shutil.rmtree(root / "plan-set", ignore_errors=True)
    s = plan(root / "data", cfg, root / "plan-set")
    return {"candidates": s["candidates"], "shards": len(s["shards"]), "errors": s["plan_errors"]}


RUNNERS = {"guard": stage_guard, "input": stage_input, "dedup": stage_dedup, "caption": stage_caption,
           "precompute": stage_precompute}


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
    result = json.loads(out.splitlines()[-1])
    # the stage process's own peak (VmHWM): Ray's raylet, GCS and workers are other processes
    return {"seconds": seconds, "rss_mb": result.pop("driver_rss_mb"), "result": result}


def build_state(n: int, root: Path, urls_only: bool = False) -> None:
    if (root / "state.json").is_file() or (urls_only and (root / "urls.parquet").is_file()):
        return
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_urls(n, root / "urls.parquet")
    if urls_only:
        return
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
        result = RUNNERS[args.run_stage](Path(args.root))
        print(json.dumps({**result, "driver_rss_mb": round(_driver_rss_mb(), 1)}))
        return {}
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = [s.strip() for s in args.stages.split(",")]
    results: dict[str, dict[int, dict]] = {s: {} for s in stages}
    for n in sizes:
        root = Path(args.out) / f"n{n}"
        build_state(n, root, urls_only=stages == ["input"])
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
