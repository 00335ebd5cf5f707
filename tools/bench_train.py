#!/usr/bin/env python
"""Training throughput side by side in one run: N-vium vs its dense baseline, nvium vs a plain PyTorch loop of
the same dense model (eager and torch.compile), nvium compiled vs eager, and 1 -> N process scaling.

Every nvium number comes from the real trainer (torchrun, tokens/s median over the steps after warm-up from
its metrics). The plain loop is what one would write by hand: transformers' LlamaForCausalLM with the dense
baseline's shape and parameter count, the same AdamW parameter groups, clipping and gradient accumulation,
random tokens of the same shape. All runs get the same threads per process (cores / --nproc) and are
interleaved round by round so that load changes hit them alike; load averages are printed with each.
Speeds are given by wall clock (tokens/s) and by CPU time (tokens per CPU-second of all processes of the
run: on a shared machine this leaves out waiting for a core). The ratios between runs use CPU time; the
process scaling uses wall time (a second process only pays off if a second core is free).

  python tools/bench_train.py --config pretrain/configs/tiny.yaml --nproc 2 --steps 30 --rounds 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvium_dist.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"nvium_dense_vs_plain_eager": 1.0, "nvium_dense_vs_plain_compiled": 0.95,
           "efficiency_vs_analytic": 0.97, "scaling": 1.7}


def timed_steps(records: list[dict]) -> list[dict]:
    return records[len(records) // 3:] or records  # the first third warms up (and compiles)


def run_trainer(config_path, overrides, nproc, threads, run_dir, tokens_per_step) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config", str(config_path)]
    for kv in overrides + [f"training.run_dir={run_dir}"]:
        cmd += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = timed_steps([r for r in records if "tokens_per_s" in r])
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            # rank 0's CPU time stands for every rank's (they run the same step)
            "tokens_per_cpu_s": statistics.median(tokens_per_step / (nproc * r["step_cpu_s"]) for r in train)}


def plain_loop(spec: dict) -> dict:
    """The hand-written loop (in its own process): -> tokens/s median over the timed steps."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvium_dist.training.schedule import adamw_param_groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["ffn_hidden_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        max_position_embeddings=spec["seq_length"], rms_norm_eps=spec["norm_eps"], rope_theta=spec["rope_theta"],
        tie_word_embeddings=False, attn_implementation="sdpa"))
    optimizer = torch.optim.AdamW(adamw_param_groups(model, spec["weight_decay"]), lr=spec["lr"],
                                  betas=(0.9, 0.95), eps=1e-8)
    forward = torch.compile(model) if spec["compile"] else model
    micro, accumulation, seq = spec["micro_batch_size"], spec["grad_accumulation"], spec["seq_length"]
    batches = torch.randint(0, spec["vocab_size"], (spec["steps"], accumulation, micro, seq + 1))
    tokens_per_s, tokens_per_cpu_s = [], []
    tokens = accumulation * micro * seq
    for step in range(spec["steps"]):
        started, cpu_started = time.perf_counter(), time.process_time()
        for micro_batch in batches[step]:
            logits = forward(input_ids=micro_batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), micro_batch[:, 1:].flatten()) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_grad"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s.append(tokens / (time.perf_counter() - started))
        tokens_per_cpu_s.append(tokens / (time.process_time() - cpu_started))
    return {"tokens_per_s": statistics.median(timed_steps(tokens_per_s)),
            "tokens_per_cpu_s": statistics.median(timed_steps(tokens_per_cpu_s)),
            "parameters": sum(p.numel() for p in model.parameters())}


def run_plain(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--plain-loop", json.dumps(spec)], check=True, env=env,
                          cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain/configs/tiny.yaml"), help="the N-vium config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--nproc", type=int_at_least(1), default=2,
                        help="processes of the N-vium vs dense runs and of the scaling run (others: 1)")
    parser.add_argument("--steps", type=int_at_least(3), default=30, help="training steps per run")
    parser.add_argument("--rounds", type=int_at_least(1), default=2,
                        help="run every configuration this many times, interleaved; medians are reported")
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)  # the hand-written loop's own process
    args = parser.parse_args(argv)
    if args.plain_loop:
        print(json.dumps(plain_loop(json.loads(args.plain_loop))))
        return 0

    from nvium_dist.config import ConfigError, load_config
    from nvium_dist.model_info import dense_twin, forward_flops_per_token, matched_dense_ffn, parameter_breakdown

    try:
        config = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    m, t = config.model, config.training
    dense = dense_twin(m, matched_dense_ffn(m))
    threads = max(1, (os.cpu_count() or 2) // args.nproc)
    common = args.set + [f"training.train_iters={args.steps}", "training.log_interval=1",
                         f"training.eval_interval={10**9}", f"training.save_interval={10**9}"]
    dense_overrides = ["model.exits=[]", f"model.ffn_hidden_size={dense.ffn_hidden_size}"]
    compiled = ["training.compile=true"]
    plain_spec = {"vocab_size": m.padded_vocab_size(1), "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                  "num_heads": m.num_heads, "ffn_hidden_size": dense.ffn_hidden_size, "seq_length": m.seq_length,
                  "norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "weight_decay": t.weight_decay, "lr": t.lr,
                  "clip_grad": t.clip_grad, "micro_batch_size": t.micro_batch_size, "steps": args.steps,
                  "grad_accumulation": t.global_batch_size // t.micro_batch_size}
    runs = {  # name -> (what it is, how to run it)
        "nvium": (f"N-vium, {args.nproc} processes", ("trainer", [], args.nproc)),
        "dense": (f"dense baseline, {args.nproc} processes", ("trainer", dense_overrides, args.nproc)),
        "nvium_dense_1p": ("dense baseline through the nvium trainer, 1 process", ("trainer", dense_overrides, 1)),
        "nvium_dense_1p_compiled": ("the same with training.compile", ("trainer", dense_overrides + compiled, 1)),
        "plain_eager": ("hand-written loop, LlamaForCausalLM, 1 process", ("plain", False, 1)),
        "plain_compiled": ("the same loop under torch.compile", ("plain", True, 1)),
    }
    if args.nproc == 1:
        del runs["nvium"], runs["dense"]
    results = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        data_run = Path(tmp) / "data"
        shared = [] if config.data.train_data else [  # reuse the default corpus the first run builds
            f"data.train_data=[{data_run}/data/shakespeare_train_text_document]",
            f"data.valid_data=[{data_run}/data/shakespeare_valid_text_document]",
            f"data.tokenizer_model={data_run}/data/tokenizer.model"]
        if shared:
            run_trainer(args.config, args.set + ["training.train_iters=1", "data.allow_default_corpus=true"], 1, threads, data_run, 1)
        for round_index in range(args.rounds):
            for name, (_, (kind, extra, nproc)) in runs.items():
                load_before = os.getloadavg()[0]
                if kind == "plain":
                    result = run_plain({**plain_spec, "compile": extra}, threads)
                else:
                    result = run_trainer(args.config, common + shared + extra, nproc, threads,
                                         Path(tmp) / f"{name}-{round_index}", t.global_batch_size * m.seq_length)
                result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                results[name].append(result)
                print(f"[bench] round {round_index + 1}/{args.rounds} {name}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"{result['tokens_per_cpu_s']:.0f} tokens/CPU-s", file=sys.stderr)
    summary = {name: {"what": runs[name][0],
                      "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rounds)),
                      "tokens_per_cpu_s": round(statistics.median(r["tokens_per_cpu_s"] for r in rounds)),
                      "per_round": [round(r["tokens_per_s"]) for r in rounds],
                      "per_round_cpu": [round(r["tokens_per_cpu_s"]) for r in rounds],
                      "loadavg_1min_before_after": [r["loadavg_1min"] for r in rounds]}
               for name, rounds in results.items()}
    summary["plain_eager"]["parameters"] = results["plain_eager"][0]["parameters"]
    speed = {name: s["tokens_per_cpu_s"] for name, s in summary.items()}
    wall = {name: s["tokens_per_s"] for name, s in summary.items()}
    ratios = {"nvium_dense_vs_plain_eager": speed["nvium_dense_1p"] / speed["plain_eager"],
              "nvium_dense_vs_plain_compiled": speed["nvium_dense_1p"] / speed["plain_compiled"],
              "nvium_dense_compiled_vs_plain_compiled": speed["nvium_dense_1p_compiled"] / speed["plain_compiled"],
              "nvium_compiled_vs_eager": speed["nvium_dense_1p_compiled"] / speed["nvium_dense_1p"]}
    report = {"config": args.config, "nproc": args.nproc, "threads_per_process": threads, "steps": args.steps,
              "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "parallel": {"tensor_parallel": config.parallel.tensor_parallel, "zero_stage": config.parallel.zero_stage},
              "dense_ffn_hidden_size": dense.ffn_hidden_size, "runs": summary}
    if args.nproc > 1:
        flops = {name: forward_flops_per_token(model, parameter_breakdown(model)["parts"])
                 for name, model in (("nvium", m), ("dense", dense))}
        analytic = flops["dense"] / flops["nvium"]
        measured = speed["nvium"] / speed["dense"]
        ratios.update({"nvium_vs_dense": measured, "analytic_throughput_ratio": analytic,
                       "efficiency_vs_analytic": measured / analytic,
                       "scaling": wall["dense"] / wall["nvium_dense_1p"]})
        report["forward_flops_per_token"] = flops
    report["ratios"] = {name: round(value, 4) for name, value in ratios.items()}
    report["targets"] = {name: target for name, target in TARGETS.items() if name in ratios}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
