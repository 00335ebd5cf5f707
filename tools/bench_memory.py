#!/usr/bin/env python
"""Activation memory and time of one training step (forward + backward of the N-vium loss) with and without
the memory savers, side by side in one process, as JSON.

    python tools/bench_memory.py --config pretrain/configs/tiny.yaml --micro-batches 8 --rounds 5
    python tools/bench_memory.py --config pretrain/configs/nvium-1.5b.yaml --device cuda \\
        --micro-batches 1,2,4,8,16 --variants checkpointed+chunked --rounds 2

Variants: plain (every head's vocab softmax kept until backward), chunked (the vocab loss
--loss-chunk-tokens at a time, recomputed in backward), checkpointed (per-block activation
checkpointing), checkpointed+chunked. One model serves all variants (the switches are attributes, the
weights the same). Memory is counted per variant by a tensor-level tracker (deterministic; on CUDA also
the allocator's peak above the step's start); time is the median over --rounds, the variants
interleaved in every round so machine load hits them alike. Each variant is reported with the
activation estimate of nvium_dist.model_info next to the measurement, and against `plain`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from nvium_dist.cli import int_at_least, int_list, torch_setup_error

VARIANTS = {"plain": (False, False), "chunked": (False, True), "checkpointed": (True, False),
            "checkpointed+chunked": (True, True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (its model section is used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--micro-batches", type=int_list(1), default="4", help="comma-separated micro-batch sizes")
    p.add_argument("--seq-length", type=int_at_least(1), help="tokens per sequence (default: the model's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--loss-chunk-tokens", type=int_at_least(0), default=0,
                   help="chunk of the chunked variants (default: training.loss_chunk_tokens, else 1024)")
    p.add_argument("--rounds", type=int_at_least(1), default=3, help="timed steps per variant (interleaved)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvium_dist.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
        micro_batches = args.micro_batches
        variants = [v for v in args.variants.split(",") if v]
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown or not variants:
            raise ConfigError(f"--variants must be among {list(VARIANTS)}, got {args.variants!r}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch

    from nvium_dist.inference.generator import ensure_process_group
    from nvium_dist.model import NviumModel
    from nvium_dist.model_info import activation_memory, measure_training_step, training_loss

    error = torch_setup_error(args.device, args.threads)
    if error:
        print(error, file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    chunk = args.loss_chunk_tokens or config.training.loss_chunk_tokens or 1024
    seq = args.seq_length or config.model.seq_length
    ensure_process_group(args.device)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = NviumModel(config.model, initialise=False).to(device, dtype)
    with torch.no_grad():  # memory and time do not depend on the values: every weight N(0, 0.02), norms 1
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("norm.weight") else torch.randn_like(param) * 0.02)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def configure(variant):
        checkpointing, chunked = VARIANTS[variant]
        model.activation_checkpointing, model.loss_chunk_tokens = checkpointing, chunk if chunked else 0

    result = {"config": args.config, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
              "seq_length": seq, "loss_chunk_tokens": chunk, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "runs": []}
    for batch in micro_batches:
        generator = torch.Generator().manual_seed(batch)
        tokens, labels = (torch.randint(0, config.model.vocab_size, (2, batch, seq), generator=generator)
                          .to(device).unbind(0))
        rows = {}
        for variant in variants:
            configure(variant)
            measured = measure_training_step(model, tokens, labels)
            estimate = activation_memory(config.model, batch, seq, dtype_bytes=dtype.itemsize,
                                         fused_norm=args.device == "cuda", activation_checkpointing=model.activation_checkpointing,
                                         loss_chunk_tokens=model.loss_chunk_tokens)
            rows[variant] = {"variant": variant, "micro_batch": batch, "measured_peak_mib": measured["peak_bytes"] / 2**20,
                             "measured_saved_mib": measured["saved_bytes"] / 2**20,
                             "estimated_peak_mib": estimate["peak_bytes"] / 2**20,
                             "estimate_over_measured": estimate["peak_bytes"] / measured["peak_bytes"],
                             "seconds": [], "allocator_peak_mib": []}
        for _ in range(args.rounds):
            for variant in variants:
                configure(variant)
                sync()
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    start_bytes = torch.cuda.memory_allocated()
                started = time.perf_counter()
                training_loss(model, tokens, labels).backward()
                sync()
                rows[variant]["seconds"].append(time.perf_counter() - started)
                if args.device == "cuda":
                    rows[variant]["allocator_peak_mib"].append((torch.cuda.max_memory_allocated() - start_bytes) / 2**20)
        for row in rows.values():
            row["seconds"] = statistics.median(row["seconds"])
            row["allocator_peak_mib"] = max(row["allocator_peak_mib"]) if row["allocator_peak_mib"] else None
            if "plain" in rows:
                row["peak_vs_plain"] = row["measured_peak_mib"] / rows["plain"]["measured_peak_mib"]
                row["time_vs_plain"] = row["seconds"] / rows["plain"]["seconds"]
            result["runs"].append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        model.zero_grad(set_to_none=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
