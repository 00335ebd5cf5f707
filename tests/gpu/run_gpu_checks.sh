#!/usr/bin/env bash
# The prepared GPU check: ONE CUDA GPU, at most 8 minutes, one JSON summary at the end (also in
# $OUT/summary.json). What it runs: tests/gpu/gpu_checks.py (train bf16/ZeRO-2/checkpointed on NCCL, resume,
# export, deferred vs full decoding, chi-square draws, batch-1 decode speed at d1536 x L48, 1.5B activation
# memory per micro-batch size).
#
#   bash tests/gpu/run_gpu_checks.sh                 # on a machine with a CUDA GPU
#   bash tests/gpu/run_gpu_checks.sh --cpu-smoke     # every piece on CPU at toy sizes (catches Python errors)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/nvium-gpu-checks}
mkdir -p "$out"
mode=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  mode=(--cpu-smoke)
elif ! nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1; then
  echo '{"ok": false, "error": "nvidia-smi failed: no CUDA GPU here (use --cpu-smoke to check the script on CPU)"}'
  exit 2
fi
timeout --signal=TERM --kill-after=10 470 python tests/gpu/gpu_checks.py --out "$out" --budget 400 "${mode[@]}"
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "{\"ok\": false, \"error\": \"timed out after 470 s\", \"partial\": $(cat "$out/summary.json" 2>/dev/null || echo null)}"
fi
exit $rc
