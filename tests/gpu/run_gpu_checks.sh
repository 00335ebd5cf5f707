#!/usr/bin/env bash
# Prepared GPU check, for a machine with one CUDA GPU (run by hand or through the device tool; CI has none):
# a few bf16 training steps with NCCL at TP=1, then the training benchmark, both on the tiny config.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/nvium-gpu}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
torchrun --standalone --nproc-per-node 1 pretrain/pretrain_nvium.py --config pretrain/configs/tiny.yaml \
  --set parallel.device=cuda --set parallel.zero_stage=0 --set training.train_iters=20 \
  --set training.eval_interval=10 --set training.log_interval=1 --set training.run_dir="$out/run" 2>&1 | tee "$out/train.log"
python - "$out/run/metrics.jsonl" <<'PY'
import json, math, sys
records = [json.loads(l) for l in open(sys.argv[1])]
losses = [r["loss"] for r in records if "loss" in r]
assert losses and all(math.isfinite(v) for v in losses), losses
print("bf16/NCCL steps ok; first/last loss", losses[0], losses[-1])
PY
python tools/bench_train.py --config pretrain/configs/tiny.yaml --nproc 1 --steps 30 \
  --set parallel.device=cuda --set parallel.zero_stage=0 | tee "$out/bench_train.json"
