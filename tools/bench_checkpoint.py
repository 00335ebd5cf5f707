#!/usr/bin/env python
"""What verified checkpoints cost: save time, and the sha256 manifest's share of it, on one process.

    python tools/bench_checkpoint.py --config pretrain/configs/tiny.yaml
    python tools/bench_checkpoint.py --config pretrain/configs/grid/nvium-d768-l24.yaml --set model.seq_length=64

Trains `--saves` steps with a checkpoint after each (the trainer's own save path, timed), then, over
`--rounds` interleaved rounds on the newest checkpoint, times: reading every file (the I/O floor),
hashing every file (what the manifest adds to a save), and `verify_manifest` (what a resume adds).
Prints one JSON object with medians, bytes and throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nvium_dist.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]


def read_all(step_dir: Path) -> int:
    total = 0
    for path in sorted(step_dir.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    total += len(chunk)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain/configs/tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--saves", type=int_at_least(1), default=3, help="training steps, each followed by a save")
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="interleaved read/hash/verify rounds")
    args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from nvium_dist.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = args.set + [f"training.run_dir={tmp}/run", f"training.train_iters={args.saves}",
                                "training.save_interval=1", f"training.keep_checkpoints={args.saves}",
                                f"training.eval_interval={10**9}", "training.eval_iters=1", "training.log_interval=1",
                                "data.allow_default_corpus=true"]  # a benchmark of saves, not of learning
        try:
            config = load_config(args.config, overrides)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        from nvium_dist.checkpoint_io import file_record, list_files, verify_manifest
        from nvium_dist.training import checkpoint as ckpt
        from nvium_dist.training.trainer import Trainer

        save_seconds = []
        real_save = ckpt.save_checkpoint

        def timed_save(*a, **k):
            start = time.perf_counter()
            path = real_save(*a, **k)
            save_seconds.append(time.perf_counter() - start)
            return path

        ckpt.save_checkpoint = timed_save
        Trainer(config).train()
        step_dir = ckpt.checkpoint_root(config.training.run_dir) / f"step_{args.saves:08d}"
        files = list_files(step_dir)
        timings = {"read_s": [], "hash_s": [], "verify_s": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            size = read_all(step_dir)
            timings["read_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for name in files:
                file_record(step_dir, name)
            timings["hash_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            verify_manifest(step_dir)
            timings["verify_s"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    save = statistics.median(save_seconds)
    print(json.dumps({
        "config": args.config, "overrides": args.set, "checkpoint_files": len(files),
        "checkpoint_bytes": size, "save_s_median": round(save, 4), "save_s_all": [round(s, 4) for s in save_seconds],
        **{k: round(v, 4) for k, v in medians.items()},
        "hash_gb_per_s": round(size / medians["hash_s"] / 1e9, 3),
        "hash_share_of_save": round(medians["hash_s"] / save, 3),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
