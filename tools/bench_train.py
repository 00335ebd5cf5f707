#!/usr/bin/env python
"""Training throughput of N-vium vs its parameter-matched dense baseline, side by side in one run.

Trains each model for a few steps with the real trainer (torchrun, same parallel setup), reads
tokens/s (median over the steps after warm-up) and peak memory from its metrics, and prints JSON with
the measured ratio next to the analytic ratio of training FLOPs per token. N-vium computes K vocab
projections and softmaxes plus adapters and routers; the target is measured >= 0.9 x analytic.

  python tools/bench_train.py --config pretrain/configs/tiny.yaml --nproc 2 --steps 30
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nvium_dist.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]


def run(config_path, overrides, nproc, run_dir) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config", str(config_path)]
    for kv in overrides + [f"training.run_dir={run_dir}"]:
        cmd += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    return train[len(train) // 3:] or train  # the first third warms up


def summarise(records: list[dict]) -> dict:
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in records), "steps_timed": len(records)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain/configs/tiny.yaml"), help="the N-vium config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    parser.add_argument("--nproc", type=int_at_least(1), default=2, help="processes per run (torchrun --nproc-per-node)")
    parser.add_argument("--steps", type=int_at_least(1), default=30, help="training steps per model and round")
    parser.add_argument("--rounds", type=int_at_least(1), default=2,
                        help="alternate N-vium and dense runs this many times, so load changes hit both alike")
    args = parser.parse_args(argv)

    from nvium_dist.config import ConfigError, load_config
    from nvium_dist.model_info import dense_twin, forward_flops_per_token, matched_dense_ffn, parameter_breakdown

    try:
        config = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    dense = dense_twin(config.model, matched_dense_ffn(config.model))
    common = args.set + [f"training.train_iters={args.steps}", "training.log_interval=1",
                         f"training.eval_interval={10**9}", f"training.save_interval={10**9}"]
    flops = {name: forward_flops_per_token(m, parameter_breakdown(m)["parts"])
             for name, m in (("nvium", config.model), ("dense", dense))}
    dense_overrides = ["model.exits=[]", f"model.ffn_hidden_size={dense.ffn_hidden_size}"]
    steps = {"nvium": [], "dense": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_run = Path(tmp) / "data"
        shared = [] if config.data.train_data else [  # reuse the default corpus the first run builds
            f"data.train_data=[{data_run}/data/shakespeare_train_text_document]",
            f"data.valid_data=[{data_run}/data/shakespeare_valid_text_document]",
            f"data.tokenizer_model={data_run}/data/tokenizer.model"]
        if shared:
            run(args.config, args.set + ["training.train_iters=1", "data.allow_default_corpus=true"], args.nproc,
                data_run)
        for round_index in range(args.rounds):
            for name, extra in (("nvium", []), ("dense", dense_overrides)):
                run_dir = Path(tmp) / f"{name}-{round_index}"
                steps[name] += run(args.config, common + shared + extra, args.nproc, run_dir)
                print(f"[bench] round {round_index + 1}/{args.rounds} {name} done", file=sys.stderr)
    nvium, dense_result = summarise(steps["nvium"]), summarise(steps["dense"])
    measured = nvium["tokens_per_s"] / dense_result["tokens_per_s"]
    analytic = flops["dense"] / flops["nvium"]
    print(json.dumps({
        "config": args.config, "nproc": args.nproc, "steps": args.steps, "rounds": args.rounds,
        "parallel": {"tensor_parallel": config.parallel.tensor_parallel, "zero_stage": config.parallel.zero_stage},
        "nvium": nvium, "dense": dense_result, "dense_ffn_hidden_size": dense.ffn_hidden_size,
        "forward_flops_per_token": flops, "analytic_throughput_ratio": round(analytic, 4),
        "measured_throughput_ratio": round(measured, 4),
        "efficiency_vs_analytic": round(measured / analytic, 4), "target_efficiency": 0.9,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
