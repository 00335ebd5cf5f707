#!/usr/bin/env python
"""Prints a model's parameter accounting as JSON, without allocating its weights (meta device).

  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml
  python tools/model_info.py --config pretrain/configs/nvium-1.5b.yaml --zero-stage 2 --gpus 4
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (its model section is used)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="add a per-GPU memory estimate for model states")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node for the memory estimate")
    parser.add_argument("--nodes", type=int, default=1, help="nodes for the memory estimate")
    parser.add_argument("--offload", action="store_true", help="estimate with ZeRO CPU offload")
    args = parser.parse_args(argv)

    from nvium_dist.config import ConfigError, load_config
    from nvium_dist.model_info import model_report, model_state_memory

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = model_report(config.model)
    if args.zero_stage is not None:
        parallel = config.parallel
        report["memory_estimate"] = model_state_memory(
            report["total_parameters"], report["largest_module_parameters"], args.zero_stage, args.gpus,
            args.nodes, parallel.tensor_parallel * parallel.pipeline_parallel, args.offload)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
