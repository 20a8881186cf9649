#!/usr/bin/env bash
# The GPU figures, as one prepared script for a lent accelerator (the `run` device tool):
#
#     bash bench/gpu.sh            # ≈ 5 minutes on an H100/H200: builds random full-size models on the GPU
#
# 1. 1024², 20 steps, CFG, bf16: sampling + decode per image, all models resident (goal ≤ 2.5 s; Lens: 3.15 s on
#    an H100), with the GPT-OSS-20B encoding timed apart; its peak GPU memory.
# 2. The same image with --offload: peak GPU memory.
# Rows go to bench-out/gpu.jsonl (bench/report.py's format); paste them into BENCHMARKS.md with the GPU's name.
# Issue 10 adds the training figures to this same script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p bench-out
OUT=bench-out/gpu.jsonl
: > "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for mode in "" "--offload"; do
  LENSFORGE_BENCH_JSON="$OUT" timeout 600 "$PY" -m bench.gpu $mode
done
echo "rows: $OUT"
cat "$OUT"
