#!/usr/bin/env python
"""Convert a Hugging Face transformers directory to nvium.

A LLaMA (LlamaForCausalLM) -> a run directory to continue pretraining from:

    python tools/convert_from_hf.py hf/llama-1b runs/llama-nvium --exits quadrivium \\
        --config pretrain/configs/tiny.yaml --set data.train_data=[data/bin/corpus_text_document]
    torchrun --nproc-per-node 2 pretrain/pretrain_nvium.py --config runs/llama-nvium/config.yaml

  The backbone (embedding, layers, final norm, lm_head) is copied; exits, adapters and routers are initialised
  as a fresh run with the config's seed would make them (--exits: 'quadrivium' = L/4, L/2, 3L/4; 'none' = a dense
  model; or layer counts 6,12,18). It writes RUN_DIR/checkpoints/step_00000000 (+ latest), RUN_DIR/config.yaml
  (the config to train with: --config and --set supply parallel/data/training) and RUN_DIR/data/tokenizer.model
  when the directory has a SentencePiece model. The trainer resumes it at step 0 with a fresh optimizer.

The paper's released N-vium checkpoints (its reference code's NviumModel) -> an nvium export, or with --to run a
run directory to continue pretraining them (every part keeps the paper's weights):

    python tools/convert_from_hf.py hf/paper-nvium exports/paper-nvium --paper --exits 6,12,18 --router-temperature 1
    python tools/generate.py --model exports/paper-nvium --prompt "The" --show-exits
    python tools/convert_from_hf.py hf/paper-nvium runs/paper-nvium --paper --to run --config pretrain/configs/nvium-1.5b.yaml

  The exit layers (early_layer_idx) and router temperature (router.router_temp) are read from config.json or the
  run's Hydra config next to the checkpoint (.hydra/config.yaml, train_config.yaml, or those of the run directory
  above checkpoints/checkpoint-N); --exits and --router-temperature override them, and a temperature found nowhere
  is an error. Early lm heads must be tied to lm_head (the paper's setting); narrower adapters or routers are
  zero-padded, which changes no output.

Only safetensors weights are read (pickled .bin files are refused); nothing is downloaded. OUTPUT may not be, hold
or sit inside the input. It must be absent, empty or an earlier output of this tool, and files this tool did not
write are never replaced; --force only replaces its own files changed since.
"""
from __future__ import annotations

import argparse
import json
import sys

from nvium_dist.cli import float_above, int_at_least


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="transformers model directory (config.json + model.safetensors)")
    p.add_argument("output", help="run directory (LLaMA) or export directory (--paper)")
    p.add_argument("--paper", action="store_true", help="the input is an N-vium checkpoint of the paper's code")
    p.add_argument("--exits", default=None,
                   help="'quadrivium' (default for a LLaMA), 'none', or layer counts like 6,12,18")
    p.add_argument("--to", choices=("run", "export"), default=None,
                   help="what to write: a run directory (the default for a LLaMA) or an export (the default and "
                        "for --paper only)")
    p.add_argument("--config", default=None, help="YAML config for the parallel/data/training sections (run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (run)")
    p.add_argument("--seq-length", type=int_at_least(1), default=None,
                   help="context length of the nvium model (default: max_position_embeddings)")
    p.add_argument("--router-temperature", type=float_above(0), default=None,
                   help="--paper: the run's router.router_temp (default: from the run's Hydra config)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier output of this tool even where its files were changed since")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.config import ConfigError, load_config
    from nvium_dist.hf.from_hf import llama_to_run_dir, reference_to_export, reference_to_run_dir
    from nvium_dist.output_dir import OutputDirError

    to = args.to or ("export" if args.paper else "run")
    try:
        if to == "export":
            if not args.paper:
                raise ConfigError("--to export converts the paper's N-vium checkpoints (--paper); a LLaMA becomes a "
                                  "run directory (its exits are untrained)")
            if args.config or args.set:
                raise ConfigError("--config/--set configure training; an export has no training section (--to run "
                                  "writes a run directory)")
            summary = reference_to_export(args.hf_dir, args.output, args.exits, args.router_temperature,
                                          args.seq_length, args.force)
        elif args.paper:
            summary = reference_to_run_dir(args.hf_dir, args.output, load_config(args.config, args.set), args.exits,
                                           args.router_temperature, args.seq_length, args.force)
        else:
            config = load_config(args.config, args.set)
            summary = llama_to_run_dir(args.hf_dir, args.output, config, args.exits or "quadrivium",
                                       args.seq_length, args.force)
    except (CheckpointError, ConfigError, OutputDirError) as err:
        print(f"convert_from_hf.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
