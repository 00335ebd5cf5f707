#!/usr/bin/env python
"""Prints a model's parameter accounting as JSON, without allocating its weights (meta device), and
optionally the per-GPU memory estimate of a training setup: model states (DeepSpeed's estimators) plus
activations of one micro-batch (a per-token count of what this model keeps for backward).

  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml
  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml --zero-stage 2 --gpus 4
  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml --zero-stage 2 --gpus 4 \\
      --micro-batch 16 --activation-checkpointing
  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml --gpus 4 --gpu-memory 79.6

--gpu-memory GIB adds the whole per-GPU budget of the config's setting (model states, activations, DeepSpeed's
buckets, CUDA context, NCCL buffers, the save transient, allocator slack) on --gpus x --nodes GPUs with the
config's parallel section, and the fastest setting (micro-batch, activation checkpointing, loss chunk) that fits
a card of GIB GiB: the fewest training FLOPs per token (no recomputation if possible), then the largest micro-batch.

Parallel sizes, dtype (bf16 on cuda), the loss chunk and activation checkpointing default to the config's.
"""
import argparse
import contextlib
import json
import sys

from nvium_dist.cli import int_at_least


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (its model section is used)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="add a per-GPU memory estimate for model states")
    parser.add_argument("--gpus", type=int_at_least(1), default=1, help="GPUs per node for the memory estimate")
    parser.add_argument("--nodes", type=int_at_least(1), default=1, help="nodes for the memory estimate")
    parser.add_argument("--offload", action="store_true", help="estimate with ZeRO CPU offload")
    parser.add_argument("--micro-batch", type=int_at_least(1), help="add an activation-memory estimate for this micro-batch size")
    parser.add_argument("--seq-length", type=int_at_least(1), help="sequence length of the activation estimate (default: the model's)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="estimate with (or --no-activation-checkpointing: without) per-block activation "
                             "checkpointing (default: training.activation_checkpointing)")
    parser.add_argument("--loss-chunk-tokens", type=int_at_least(0),
                        help="tokens per chunk of the vocab loss, 0 for none (default: training.loss_chunk_tokens)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="GiB of one GPU (an H100 80GB: 79.6); prints the budget and the fastest setting that fits")
    args = parser.parse_args(argv)
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        parser.error(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")

    from nvium_dist.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; stdout is for the JSON
        report = estimate(args, config)
    print(json.dumps(report, indent=2))
    return 0


def estimate(args, config) -> dict:
    from nvium_dist.model_info import activation_memory, fastest_fitting_setting, gpu_memory_budget, model_report, \
        model_state_memory

    report = model_report(config.model)
    parallel, training = config.parallel, config.training
    if args.zero_stage is not None:
        report["memory_estimate"] = model_state_memory(
            report["total_parameters"], report["largest_module_parameters"], args.zero_stage, args.gpus,
            args.nodes, parallel.tensor_parallel * parallel.pipeline_parallel, args.offload)
    if args.micro_batch is not None:
        activations = activation_memory(
            config.model, args.micro_batch, args.seq_length, tensor_parallel=parallel.tensor_parallel,
            pipeline_parallel=parallel.pipeline_parallel, dtype_bytes=parallel.dtype_bytes,
            fused_norm=parallel.device == "cuda",
            activation_checkpointing=(training.activation_checkpointing if args.activation_checkpointing is None
                                      else args.activation_checkpointing),
            loss_chunk_tokens=training.loss_chunk_tokens if args.loss_chunk_tokens is None else args.loss_chunk_tokens)
        report["activation_estimate"] = activations
        if "memory_estimate" in report:
            report["per_gpu_total_gib"] = round(report["memory_estimate"]["per_gpu_gib"] + activations["peak_gib"], 3)
    if args.gpu_memory is not None:
        world = args.gpus * args.nodes
        report["gpu_budget"] = gpu_memory_budget(config, world, args.gpus, args.micro_batch,
                                                 args.activation_checkpointing, args.loss_chunk_tokens)
        report["fastest_fitting_setting"] = fastest_fitting_setting(config, args.gpu_memory, world, args.gpus)
    return report


if __name__ == "__main__":
    sys.exit(main())
