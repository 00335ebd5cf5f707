#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and every dependency, and installs nvium_dist in editable mode.
# --with-slurm also installs the Debian Slurm packages the SLURM tests start (munge, slurmctld, slurmd, slurm-client).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--with-slurm" ]] && ! command -v slurmctld >/dev/null; then
  echo "[setup] installing Slurm from Debian packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
fi
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
quiet() { "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }
echo "[setup] installing torch (CPU wheel) first, then the rest"
# torch first: an unpinned torch resolved by another package would pull a multi-GB CUDA build.
quiet pip install -q torch==2.13.0
DS_BUILD_OPS=0 quiet pip install -q -r requirements.txt
quiet pip install -q --no-deps -e .
# lets the plain `lm_eval --model nvium ...` command find nvium's model type (lm-eval has no plugin entry points)
python -m nvium_dist.evaluation.lm_eval_hook install >/dev/null
echo "[setup] done: $(python -c 'import torch, megatron.core, deepspeed; print("torch", torch.__version__, "megatron-core", megatron.core.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
