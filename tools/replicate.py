#!/usr/bin/env python
"""Reproduce the N-vium claim at small scale, end to end, with one command, and write a report.

    python tools/replicate.py                          # 2-core CPU scale, 400 steps: ~9 min idle (~25 loaded)
    python tools/replicate.py --scale small            # a bigger CPU run (a few hours on 2 cores)
    python tools/replicate.py --scale gpu              # one CUDA machine (bf16, NCCL)
    python tools/replicate.py --scale micro --output-dir /tmp/rep   # smoke test, about 2 minutes

Stages (each prints a [replicate] line; re-running the same command skips finished stages):
  1. dense baseline: trains the parameter-matched dense twin FIRST (via torchrun, --nproc processes); on
     the default corpus the trainer builds the bundled Shakespeare corpus, a SentencePiece tokenizer and
     the .bin/.idx under its run directory
  2. N-vium (Quadrivium: exits at L/4, L/2, 3L/4) on the same data prefixes, tokenizer, schedule, seed and
     tokens, with the beta controller reading the dense run's metrics.jsonl
  3. export of both (tools/export_checkpoint.py, self-checked)
  4. held-out perplexity of both on the whole validation split (tools/evaluate.py, same windows)
  5. decoding throughput (nvium_dist.inference): dense, N-vium full depth and N-vium deferred, batch sizes
     --batch-sizes, the three interleaved per repeat (best of --repeats), same prompts and seed
  6. a generated passage with the exit each token took
  7. the report: OUTPUT/report.md, OUTPUT/results.json (every number in the report) and PNG plots

Run directories, exports and per-stage JSON live under --work-dir (default runs/replicate-SCALE, not
committed); the report directory (--output-dir, default reports/replicate) holds only small files.
Targets checked in the report: N-vium held-out perplexity <= 1.01 x dense; deferred N-vium decodes
>= 1.3x the dense tokens/s at batch 1; no dead head (N-vium's final head alone <= 1.5 x the dense perplexity).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nvium_dist.cli import int_list  # noqa: E402
from nvium_dist.replicate.pipeline import SCALES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                   help="preset size: micro (smoke test), tiny (2-core CPU, ~40 min), small (bigger CPU), gpu")
    p.add_argument("--output-dir", default="reports/replicate", help="report directory (report.md, results.json, PNGs)")
    p.add_argument("--work-dir", default=None, help="run dirs, exports, stage JSON (default runs/replicate-SCALE)")
    p.add_argument("--steps", type=int, help="training steps of each model (override the scale)")
    p.add_argument("--layers", type=int, help="number of layers L (exits go to L/4, L/2, 3L/4)")
    p.add_argument("--hidden", type=int, help="hidden size")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--ffn", type=int, help="N-vium MLP width (the dense twin gets the parameter-matched width)")
    p.add_argument("--seq-length", type=int, help="context length")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, help="sequences per process per micro-step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-interval", type=int, help="steps between evaluations (and beta-controller updates)")
    p.add_argument("--beta", type=float, default=0.0, help="initial depth-penalty weight beta")
    p.add_argument("--k-up", type=float, default=2.0, help="beta controller gain when N-vium is ahead")
    p.add_argument("--k-down", type=float, default=8.0, help="beta controller gain when N-vium is behind")
    p.add_argument("--dead-band", type=float, default=0.005, help="beta controller dead band in nats")
    p.add_argument("--max-step", type=float, default=0.05, help="largest beta change per evaluation")
    p.add_argument("--router-warmup-fraction", type=float, default=0.05, help="router warmup share of the steps")
    p.add_argument("--aux-head-loss", type=float, default=0.0,
                   help="weight of the opt-in per-head loss (training.aux_head_loss; 0 = the paper's objective)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--nproc", type=int, default=2, help="training processes per run (torchrun --nproc-per-node)")
    p.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage (default 2 on CPU, 1 on GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="training/decoding device (default: the scale's)")
    p.add_argument("--batch-sizes", type=int_list(1), default="1,8", help="decode batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, help="timed decode runs per model and batch size (best is reported)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per sequence in the decode benchmark")
    p.add_argument("--threads", type=int, default=1, help="torch threads for decoding (1: latency-bound small batch)")
    p.add_argument("--eval-windows", type=int, help="held-out windows evaluated (default: the whole validation split)")
    p.add_argument("--prompt", default="ROMEO:\n", help="prompt of the coloured passage")
    p.add_argument("--date", default=None, help="date printed in the report (default: today)")
    p.add_argument("--force", action="append", default=[],
                   choices=["bench", "eval", "export", "passage", "report"],
                   help="redo a finished stage (repeatable); training resumes/skips by itself")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvium_dist.replicate.pipeline import Replication

    return Replication(args).run()


if __name__ == "__main__":
    sys.exit(main())
