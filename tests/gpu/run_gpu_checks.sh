#!/usr/bin/env bash
# The prepared GPU check: ONE CUDA GPU, at most 8 minutes, one JSON summary at the end (also in
# $OUT/summary.json). What it runs: tests/gpu/gpu_checks.py (train bf16/ZeRO-2/checkpointed on NCCL, resume,
# export, deferred vs full decoding, chi-square draws, batch-1 decode speed at d1536 x L48, 1.5B activation
# memory per micro-batch size, allocator peak vs the memory budget with a timed save, bench_decode on the GPU;
# with 2+ GPUs: ZeRO-2 fp32 reduction, TP=2, PP=2 resumed into DP=2 with fused AdamW, pipeline decoding).
#
#   bash tests/gpu/run_gpu_checks.sh                 # on a machine with a CUDA GPU
#   bash tests/gpu/run_gpu_checks.sh --cpu-smoke     # every piece on CPU at toy sizes (catches Python errors)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/nvium-gpu-checks}
mkdir -p "$out"
mode=()
# on the GPU machine: at most 8 minutes; the CPU smoke has no such limit and runs every check (a shared
# 2-core machine takes minutes for the trainer start-ups alone)
limit=470 budget=400
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  mode=(--cpu-smoke)
  limit=2400 budget=2100
elif ! nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1; then
  echo '{"ok": false, "error": "nvidia-smi failed: no CUDA GPU here (use --cpu-smoke to check the script on CPU)"}'
  exit 2
fi
timeout --signal=TERM --kill-after=10 "$limit" python tests/gpu/gpu_checks.py --out "$out" --budget "$budget" "${mode[@]}"
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "{\"ok\": false, \"error\": \"timed out after $limit s\", \"partial\": $(cat "$out/summary.json" 2>/dev/null || echo null)}"
fi
exit $rc
