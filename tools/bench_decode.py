#!/usr/bin/env python
"""Decoding throughput of an N-vium export: full-depth vs deferred, side by side, as JSON.

    python tools/bench_decode.py --model exports/tiny --baseline exports/tiny-dense

For each batch size (default 1, 4, 16) the same prompts and seed are decoded with mode=full (every layer
every step) and mode=deferred (each token only up to its sampled exit), alternating, best of --repeats.
Both produce the same tokens, so the comparison is exact. Reports tokens/s of each, the dense baseline's
tokens/s (--baseline), the measured exit distribution, the ideal speedup num_layers / E[exit layer] and
efficiency = measured speedup / ideal speedup. A batch decodes in lockstep, so each step is as deep as its
deepest row: `lockstep_ideal_speedup` = num_layers / E[max exit layer per step] is the bound for batch > 1.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="N-vium export directory")
    p.add_argument("--baseline", help="dense export directory (exits: []) to compare tokens/s with")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence per run")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting, alternating modes (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small-batch decoding is latency bound; 0 = torch default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def make_prompts(generator, batch: int, length: int, seed: int) -> list[list[int]]:
    """Text prompts when the export has a tokenizer (CPython's bundled pydoc topics), else random ids."""
    import random

    text = ""
    if generator.tokenizer.kind != "none":
        try:
            from pydoc_data import topics

            text = "\n".join(topics.topics.values())
        except ImportError:
            text = ""
    rng = random.Random(seed)
    prompts = []
    for _ in range(batch):
        if text:
            start = rng.randrange(0, len(text) - 40 * length)
            ids = generator.tokenizer.encode(text[start:start + 40 * length])[:length]
        else:
            ids = [rng.randrange(generator.config.vocab_size) for _ in range(length)]
        prompts.append(ids)
    return prompts


def timed_pair(generator, prompts, new_tokens, seed, repeats, sync):
    """Alternates full and deferred runs (so load changes on a shared machine hit both alike); best of each."""
    best = {"full": None, "deferred": None}
    outs = {}
    for _ in range(repeats):
        for mode in ("full", "deferred"):
            sync()
            out = generator.generate(prompts, new_tokens, seed=seed, mode=mode)
            sync()
            outs[mode] = out
            best[mode] = out.seconds if best[mode] is None else min(best[mode], out.seconds)
    return {mode: (outs[mode].num_tokens / best[mode], outs[mode]) for mode in best}


def timed(generator, prompts, new_tokens, seed, mode, repeats, sync):
    best, out = None, None
    for _ in range(repeats):
        sync()
        out = generator.generate(prompts, new_tokens, seed=seed, mode=mode)
        sync()
        best = out.seconds if best is None else min(best, out.seconds)
    return out.num_tokens / best, out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    except ValueError:
        print(f"error: --batch-sizes {args.batch_sizes!r} must be comma-separated integers", file=sys.stderr)
        return 2

    import torch

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference import GenerationError, NviumGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    try:
        generator = NviumGenerator.from_pretrained(args.model, device=args.device)
        baseline = NviumGenerator.from_pretrained(args.baseline, device=args.device) if args.baseline else None
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if baseline is not None and baseline.config.exits:
        print(f"warning: --baseline {args.baseline} has exits {baseline.config.exits}; it is timed at full depth",
              file=sys.stderr)
    config = generator.config
    context = config.seq_length
    if args.prompt_tokens + args.new_tokens > context:
        print(f"error: --prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the model "
              f"context {context}", file=sys.stderr)
        return 2
    result = {"model": args.model, "baseline": args.baseline, "num_layers": config.num_layers,
              "exit_layers": config.exit_layers, "threads": torch.get_num_threads(), "device": args.device,
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "batches": []}
    hist_total = [0] * config.num_heads_total
    try:
        for batch in batch_sizes:
            prompts = make_prompts(generator, batch, args.prompt_tokens, args.seed + batch)
            print(f"batch {batch}: warming up", file=sys.stderr, flush=True)
            generator.generate(prompts, min(8, args.new_tokens), seed=args.seed, mode="full")
            generator.generate(prompts, min(8, args.new_tokens), seed=args.seed, mode="deferred")
            pair = timed_pair(generator, prompts, args.new_tokens, args.seed, args.repeats, sync)
            (full_tps, full_out), (deferred_tps, deferred_out) = pair["full"], pair["deferred"]
            if full_out.tokens != deferred_out.tokens:
                print("warning: full and deferred tokens differ (a floating-point tie at a sampling boundary)",
                      file=sys.stderr)
            hist = deferred_out.exit_histogram()
            hist_total = [a + b for a, b in zip(hist_total, hist)]
            mean_layer = deferred_out.mean_exit_layer()
            ideal = config.num_layers / mean_layer
            measured = deferred_tps / full_tps
            # a batch decodes in lockstep: a step is as deep as its deepest row, so the sequential-depth bound
            # for batch B is num_layers / E[max exit layer over the rows of a step]
            layers = config.exit_layers
            steps = max(len(row) for row in deferred_out.exits)
            step_depths = [max(layers[row[t]] for row in deferred_out.exits if t < len(row)) for t in range(steps)]
            lockstep_ideal = config.num_layers / (sum(step_depths) / len(step_depths))
            entry = {"batch": batch, "full_tokens_per_s": round(full_tps, 2),
                     "deferred_tokens_per_s": round(deferred_tps, 2),
                     "measured_speedup": round(measured, 3), "mean_exit_layer": round(mean_layer, 3),
                     "ideal_speedup": round(ideal, 3), "efficiency": round(measured / ideal, 3),
                     "lockstep_ideal_speedup": round(lockstep_ideal, 3),
                     "lockstep_efficiency": round(measured / lockstep_ideal, 3),
                     "exit_histogram": hist}
            if baseline is not None:
                base_prompts = [[t % baseline.config.vocab_size for t in p] for p in prompts]
                baseline.generate(base_prompts, min(8, args.new_tokens), seed=args.seed, mode="full")
                base_tps, _ = timed(baseline, base_prompts, args.new_tokens, args.seed, "full", args.repeats, sync)
                entry["baseline_tokens_per_s"] = round(base_tps, 2)
                entry["deferred_vs_baseline"] = round(deferred_tps / base_tps, 3)
            result["batches"].append(entry)
            print(f"batch {batch}: full {full_tps:.1f} tok/s, deferred {deferred_tps:.1f} tok/s, speedup "
                  f"{measured:.2f}x of ideal {ideal:.2f}x (efficiency {measured / ideal:.2f}; lockstep bound "
                  f"{lockstep_ideal:.2f}x)"
                  + (f", dense baseline {entry['baseline_tokens_per_s']:.1f} tok/s" if baseline else ""),
                  file=sys.stderr, flush=True)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(hist_total)
    result["exit_distribution"] = [c / total for c in hist_total] if total else []
    mean_layer = sum(c * l for c, l in zip(hist_total, config.exit_layers)) / total if total else config.num_layers
    result["mean_exit_layer"] = mean_layer
    result["ideal_speedup"] = config.num_layers / mean_layer
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
