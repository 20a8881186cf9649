"""Loading the full-size Lens (4.10 B parameters, bf16 ≈ 8.2 GB) from a release layout: peak RSS and time, beside
a plain safetensors read of the same files, each in a fresh process, alternating, medians.

    .venv/bin/python -m bench.load                    # writes a random lens-3.8b release once (~8.2 GB, /tmp)
    .venv/bin/python -m bench.load --preset small --repeats 2       # a quick check of the script

1. A random `lens-3.8b` transformer in bf16 is written as the release lays it out (inference/lens_format.py:
   config.json + sharded safetensors + index; reused when already there).
2. ours: `inference.checkpoint.load_denoiser(DIR)` (meta-device build, `assign`, each tensor read into its own
   allocation), in a fresh process; peak RSS (VmHWM: Python + torch + the model) against the file size.
   Goal ≤ 1.15×.
3. peers, each in a fresh process: `safetensors.torch.load_file` of every shard with every page touched (the same
   bytes read, zero-copy: its tensors stay in the file's memory map, at the file's alignment), and the same with
   every tensor cloned into its own memory (what an aligned, file-independent copy costs that way).
Both read from a warm page cache (the files are read once first), so the figure is memory bandwidth, not disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.report, also for `python bench/load.py`
from bench.report import emit, row  # noqa: E402

CHILD = r"""
import json, sys, time, torch
def rss_gb():  # VmHWM: this process's peak RSS since its exec (ru_maxrss would carry the parent's over exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1e6  # kB → GB
kind, folder = sys.argv[1], sys.argv[2]
from pathlib import Path
from safetensors.torch import load_file
from inference.checkpoint import load_denoiser
from inference.lens_format import transformer_files
base = rss_gb()  # after the imports: what the process holds before any weight
start = time.perf_counter()
if kind == "ours":
    model = load_denoiser(folder)
    n = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
elif kind == "safetensors":  # tensors left in the file's memory map, every page touched: the bytes are read
    n, keep = 0, []
    for f in transformer_files(Path(folder)):
        state = load_file(str(f))
        for t in state.values():
            n += t.numel()
            t.reshape(-1).view(torch.uint8)[::4096].sum()
        keep.append(state)
else:  # "safetensors+copy": the same, each tensor then copied into its own memory (the map dropped per file)
    n, keep = 0, []
    for f in transformer_files(Path(folder)):
        state = {k: t.clone() for k, t in load_file(str(f)).items()}
        n += sum(t.numel() for t in state.values())
        keep.append(state)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_gb": rss_gb(), "base_gb": base, "params": n}))
"""


def write_release(folder: Path, preset: str, shard_size: str) -> int:
    """A random `preset` transformer in bf16, in the released layout; returns its bytes on disk."""
    from inference.config import get_preset
    from inference.lens_format import CONFIG_FILE, transformer_files, write_transformer_dir
    from inference.mmdit import MMDiT

    if (folder / CONFIG_FILE).is_file():
        try:
            return sum(f.stat().st_size for f in transformer_files(folder))
        except FileNotFoundError:
            pass
    cfg = get_preset(preset)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MMDiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    print(f"writing a random {preset} release in bf16 to {folder} …", flush=True)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    write_transformer_dir(state, cfg, folder, layers=list(range(cfg.text_layers)), max_shard_size=shard_size)
    return sum(f.stat().st_size for f in transformer_files(folder))


def measure(kind: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(folder)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"{kind} load failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lens-3.8b")
    parser.add_argument("--dir", default="/tmp/lensforge-bench-load", help="where the release is written (kept)")
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    folder = Path(args.dir) / args.preset / "transformer"
    size = write_release(folder, args.preset, args.shard_size)
    from inference.lens_format import transformer_files

    for f in transformer_files(folder):  # warm the page cache: both sides then read from memory
        with open(f, "rb") as fh:
            while fh.read(2**26):
                pass
    runs = {"ours": [], "safetensors": [], "safetensors+copy": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(measure(kind, folder))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "peak_gb", "base_gb")}
           for k, v in runs.items()}
    gb = size / 1e9
    ours, peer, copy = med["ours"], med["safetensors"], med["safetensors+copy"]
    print(f"{args.preset}: {runs['ours'][0]['params']:,} parameters, {gb:.2f} GB on disk in "
          f"{len(transformer_files(folder))} shard(s)")
    for kind, m in med.items():
        print(f"  {kind:<16} {m['seconds']:6.2f} s   peak RSS {m['peak_gb']:.2f} GB = {m['peak_gb'] / gb:.3f}× the "
              f"files (Python + torch alone: {m['base_gb']:.2f} GB)")
    print(f"  time ours / plain safetensors read: {ours['seconds'] / peer['seconds']:.2f}×, / safetensors + copy: "
          f"{ours['seconds'] / copy['seconds']:.2f}× (medians of {args.repeats}, alternating)")
    emit([
        row("load", f"{args.preset} bf16 release: peak RSS / file size", ours["peak_gb"] / gb, "×",
            ratio=ours["peak_gb"] / gb, goal="<= 1.15", note=f"{gb:.2f} GB in {len(transformer_files(folder))} "
            "shards; RSS includes Python + torch"),
        row("load", f"{args.preset} bf16 release: load time", ours["seconds"], "s", peer=peer["seconds"],
            peer_name="safetensors.load_file (tensors left in its memory map), every page touched"),
        row("load", f"{args.preset} bf16 release: load time against a copying read", ours["seconds"], "s",
            peer=copy["seconds"], peer_name="safetensors.load_file, each tensor cloned into its own memory",
            note=f"that read peaks at {copy['peak_gb'] / gb:.2f}× the files"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
