#!/usr/bin/env bash
# The main job end to end on a fresh machine: install, build the bundled Shakespeare corpus, train a
# 2048-piece SentencePiece tokenizer, preprocess to Megatron .bin/.idx, train the tiny N-vium with two
# CPU processes (DP=2, ZeRO-2; ~4 minutes), evaluate, export and generate.
# Override with env: RUN_DIR (default runs/quickstart), NPROC (2), STEPS (300), EXTRA_SET ("key=value ..."),
# NVIUM_SKIP_SETUP=1 (use the active Python environment instead of installing .venv).
# Fails (exit 3) if the trained model has a dead head (a head whose perplexity is >= the vocabulary size).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${NVIUM_SKIP_SETUP:-0}" != "1" ]]; then
  bash scripts/setup.sh
  . .venv/bin/activate
fi
RUN_DIR=${RUN_DIR:-runs/quickstart}
NPROC=${NPROC:-2}
STEPS=${STEPS:-300}
sets=(--set "training.run_dir=$RUN_DIR" --set "training.train_iters=$STEPS")
for kv in ${EXTRA_SET:-}; do sets+=(--set "$kv"); done

echo "== training the tiny N-vium on $NPROC processes (data is built under $RUN_DIR/data on first use)"
OMP_NUM_THREADS=1 torchrun --nproc-per-node "$NPROC" pretrain/pretrain_nvium.py \
  --config pretrain/configs/tiny.yaml "${sets[@]}"

echo "== exporting $RUN_DIR -> $RUN_DIR/export"
python tools/export_checkpoint.py --checkpoint "$RUN_DIR" --output "$RUN_DIR/export"

echo "== evaluating on the held-out plays (and checking that every head is alive)"
status=0
python tools/evaluate.py --model "$RUN_DIR/export" --data "$RUN_DIR/data/shakespeare_valid_text_document" \
  --require-live-heads > "$RUN_DIR/eval.json" || status=$?
cat "$RUN_DIR/eval.json"
if [[ $status -ne 0 ]]; then exit "$status"; fi

echo "== generating (exact deferred sampling from the mixture)"
python tools/generate.py --model "$RUN_DIR/export" --max-new-tokens 60 --seed 0 --show-exits \
  "ROMEO. " "Enter KING HENRY"

cat <<DONE

Everything went to $RUN_DIR:
  metrics        $RUN_DIR/metrics.jsonl   (one JSON object per logged step / evaluation)
  checkpoints    $RUN_DIR/checkpoints/    (latest -> newest complete one)
  data           $RUN_DIR/data/           (corpus JSONL, tokenizer.model, .bin/.idx)
  export         $RUN_DIR/export/         (config.json, model.safetensors, tokenizer.model)
  evaluation     $RUN_DIR/eval.json

To run the tools yourself, activate the environment first (without it: ModuleNotFoundError):
  . .venv/bin/activate
  python tools/generate.py --model $RUN_DIR/export --prompt "ROMEO:" --max-new-tokens 40 --show-exits
Your own text, step by step: README.md ("Train on your own text"); everything else: docs/.
DONE
