#!/usr/bin/env bash
# The GPU figures, as one prepared script for a lent accelerator (the `run` device tool):
#
#     bash bench/gpu.sh            # ≈ 8 minutes on an H100/H200: builds random full-size models on the GPU
#
# 1. 1024², 20 steps, CFG, bf16: sampling + decode per image, all models resident (goal ≤ 2.5 s; Lens: 3.15 s on
#    an H100), with the GPT-OSS-20B encoding timed apart; its peak GPU memory.
# 2. The same image with --offload: peak GPU memory.
# 2b. A distilled student's image (lensforge distill, Lens-Turbo's way): 1024², 4 steps, no CFG, per image
#     (Lens-Turbo: 0.84 s on an H100).
# 3. Training steps of lens-3.8b at 1024², micro-batch 6, as configs/lens-lora.yaml (LoRA r 64, bf16 base) and
#    configs/lens-finetune.yaml (full, fp32 master + AdamW; batch 1 if 6 runs out of memory, else "does not fit on
#    one GPU") train them: step time, peak memory, MFU against PEAK_TFLOPS (H100/H200 SXM dense bf16: 989).
# 4. The memory-per-GPU arithmetic of fine-tuning (bench.gpu --arithmetic), to compare with 3's peaks.
# Rows go to bench-out/gpu.jsonl (bench/report.py's format); paste them into BENCHMARKS.md with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p bench-out
OUT=bench-out/gpu.jsonl
: > "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for mode in "" "--offload"; do
  LENSFORGE_BENCH_JSON="$OUT" timeout 600 "$PY" -m bench.gpu $mode
done
LENSFORGE_BENCH_JSON="$OUT" timeout 600 "$PY" -m bench.gpu --steps 4 --cfg 1
for mode in lora full; do  # a process each: one's peak memory and fragmentation never reach the other
  LENSFORGE_BENCH_JSON="$OUT" timeout 600 "$PY" -m bench.gpu --train "$mode" --peak-tflops "$PEAK_TFLOPS"
done
"$PY" -m bench.gpu --arithmetic
echo "rows: $OUT"
cat "$OUT"
