"""Run every bench script and write BENCHMARKS.md: one table of figures, each beside a peer or a limit measured in
the same run, with the machine, the date and the commands.

    .venv/bin/python -m bench.write_benchmarks                  # what `make bench` runs: full sizes, many minutes
    .venv/bin/python -m bench.write_benchmarks --only model,caption
    .venv/bin/python -m bench.write_benchmarks --quick          # shrunk smoke run → bench-out/BENCHMARKS.quick.md

Each script (bench/<stage>.py, run as `python -m bench.<stage>` from the repository root) prints its own figures and
appends them as JSON lines to $LENSFORGE_BENCH_JSON (bench/report.py); this file only runs them and writes the
table. `--quick` sizes are for checking that the scripts and the table work, not for quoting: that file says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, also for `python bench/write_benchmarks.py`
from bench.report import ENV  # noqa: E402

# Stage → (arguments of the full run, arguments of a --quick smoke run). Full: each script's own defaults, and the
# curate repeats the README quotes.
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "curate": (["--repeats", "2"], ["--n", "200", "--out", "bench-out/quick/curate"]),
    "caption": ([], ["--seconds", "1", "--in-flight", "64", "--sequential", "3"]),
    "model": ([], ["--repeats", "1", "--steps", "2", "--batch", "1"]),
    # 256: the steady rate counts rows after the first output batch; at 64 they all come in the first one.
    "precompute": ([], ["--n", "256", "--out", "bench-out/quick/precompute"]),
    "train": ([], ["--samples", "64", "--batch", "2", "--steps", "4", "--work", "bench-out/quick/train"]),
    # full: a random lens-3.8b release in bf16, 8.2 GB written once under /tmp (about 13 GB of RAM while writing)
    "load": ([], ["--preset", "small", "--repeats", "1", "--dir", "bench-out/quick/load"]),
}
GOAL = re.compile(r"\s*(>=|<=|>|<|≥|≤)\s*([-+0-9.eE]+)\s*$")
OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "≥": "≥", "≤": "≤"}


def machine() -> dict:
    """CPU model, cores, RAM, GPUs, torch and Python versions of this machine."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "ram_gib": None,
            "gpu": "none", "torch": None, "python": platform.python_version(), "os": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return info


def run_script(stage: str, args: list[str]) -> tuple[list[dict], dict]:
    """Run bench/<stage>.py with its rows collected; its output goes to this terminal as it comes."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        cmd = [sys.executable, "-m", f"bench.{stage}", *args]
        started = time.perf_counter()
        print(f"\n== {stage}: {shlex.join(cmd)}", flush=True)
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, ENV: str(rows_file)})
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    run = {"stage": stage, "command": shlex.join([python, "-m", f"bench.{stage}", *args]),
           "seconds": time.perf_counter() - started, "returncode": done.returncode}
    return rows, run


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def goal_cell(r: dict) -> str:
    """"≥ 0.9 — met" / "≥ 0.9 — **not met**" / "" when the row has no goal (or nothing to compare)."""
    match = GOAL.match(r.get("goal") or "")
    if not match:
        return r.get("goal") or ""
    op, bound = OPS[match.group(1)], float(match.group(2))
    x = r["ratio"] if r.get("goal_of", "ratio") == "ratio" else r["value"]
    text = f"{op} {match.group(2)}" + ("×" if r.get("goal_of", "ratio") == "ratio" else f" {r['unit']}")
    if x is None:
        return text
    met = {"≥": x >= bound, "≤": x <= bound, ">": x > bound, "<": x < bound}[op]
    return f"{text} — {'met' if met else '**not met**'}"


def table_row(r: dict) -> str:
    ours = f"{fmt(r['value'])} {r['unit']}"
    peer = f"{r['peer_name']} {fmt(r['peer'])} {r['unit']}".strip() if r.get("peer") is not None else "—"
    x = r.get("ratio")
    ratio = "—" if x is None else f"{fmt(x) if abs(x) >= 10 else format(x, '.2f')}×"
    cells = [r["stage"], r["figure"] + (f" ({r['note']})" if r.get("note") else ""), ours, peer, ratio, goal_cell(r)]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


# BENCHMARKS.md from this line on is kept when the table is written again: benchmarks run by hand (bench/scale.py
# takes ~30 min and is not part of `make bench`), each with its own command, machine and date.
KEEP_MARKER = "<!-- below: benchmarks run by hand, kept when `make bench` writes the table above -->"


def kept_tail(old: str) -> str:
    """The hand-run sections of an existing BENCHMARKS.md (from KEEP_MARKER on), or ""."""
    at = old.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + old[at:]


def render_markdown(rows: list[dict], runs: list[dict], info: dict, command: str, date: str,
                    quick: bool = False) -> str:
    """BENCHMARKS.md: the table, the machine, the date and the commands (failed scripts named, not hidden)."""
    gpu = info.get("gpu") or "none"
    lines = ["# Benchmarks", ""]
    if quick:
        lines += ["**Quick smoke run with shrunk sizes (`--quick`): these figures only show that the scripts and this "
                  "table work. Do not quote them; run `make bench` for the real ones.**", ""]
    lines += [
        "Every figure stands beside a peer or a limit measured in the same run on the same machine; shared machines "
        "are noisy, so read the ratios rather than the seconds. Ratio = lensforge / peer.", "",
        f"- **Machine**: {info.get('cpu')}, {info.get('cores')} cores, {fmt(info.get('ram_gib'))} GiB RAM, "
        f"GPU: {gpu}; torch {info.get('torch')}, Python {info.get('python')}, {info.get('os')}",
        f"- **Date**: {date}" + (f"; load average (1 min) {fmt(info['load'][0])} at the start, {fmt(info['load'][1])} "
                                 "at the end" if info.get("load") else ""),
        f"- **Command**: `{command}`", "",
        "| stage | figure | lensforge | peer or limit | ratio | goal |",
        "|---|---|---|---|---|---|",
        *[table_row(r) for r in rows], "",
        "Each stage's own command (run from the repository root):", "",
    ]
    for run in runs:
        status = "" if run["returncode"] == 0 else f" — **failed with exit code {run['returncode']}**"
        lines.append(f"- {run['stage']}: `{run['command']}` ({run['seconds']:.0f} s){status}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="default: BENCHMARKS.md (bench-out/BENCHMARKS.quick.md with --quick)")
    parser.add_argument("--only", default=None, metavar="STAGE,...", help=f"a subset of {', '.join(SCRIPTS)}")
    parser.add_argument("--quick", action="store_true", help="shrunk sizes: a smoke run of scripts and table")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",")] if args.only else list(SCRIPTS)
    unknown = sorted(set(stages) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; known: {', '.join(SCRIPTS)}")
    out = Path(args.out or (REPO / "bench-out" / "BENCHMARKS.quick.md" if args.quick else REPO / "BENCHMARKS.md"))
    command = shlex.join(["python", "-m", "bench.write_benchmarks", *(argv if argv is not None else sys.argv[1:])])
    if os.environ.get("MAKELEVEL"):
        command = f"make bench  # {command}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, runs = [], []
    for stage in stages:
        got, run = run_script(stage, SCRIPTS[stage][1 if args.quick else 0])
        rows += got
        runs.append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "load": (load, os.getloadavg()[0] if load is not None else None)}
    tail = kept_tail(out.read_text()) if out.is_file() else ""
    out.write_text(render_markdown(rows, runs, info, command, date, quick=args.quick) + tail)
    print(f"\nbench: {len(rows)} figures from {len(runs)} scripts → {out}")
    return int(any(r["returncode"] for r in runs))


if __name__ == "__main__":
    sys.exit(main())
