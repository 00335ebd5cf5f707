#!/usr/bin/env python
"""Pretrain an N-vium model (or its dense baseline) with megatron-core TP layers and DeepSpeed.

Launch with torchrun (or srun + torchrun); TP, PP and the ZeRO stage come from the config and DP is
what remains of the world size:

  torchrun --nproc-per-node 2 pretrain/pretrain_nvium.py --config pretrain/configs/tiny.yaml
  torchrun --nproc-per-node 2 pretrain/pretrain_nvium.py --config pretrain/configs/tiny.yaml \\
      --set parallel.tensor_parallel=2 --set training.run_dir=runs/tiny-tp2

A run directory with a checkpoint resumes automatically (see README: Checkpoints). SIGTERM, SIGUSR1
(Slurm's pre-timeout signal) or Ctrl-C finishes the current step, saves a checkpoint and exits 0. Exit codes
(a diverged run, a hang) are listed in nvium_dist/exit_codes.py and docs/long-runs.md. The dense baseline is the same
trainer with `model.exits: []` and the matched MLP width (pretrain/configs/*-dense.yaml).
"""
import argparse
import os
import sys


def report_config_error(error) -> None:
    """Every rank finds the same config error; under torchrun only the first says so."""
    if os.environ.get("RANK", "0") == "0":
        print(f"config error: {error}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with sections model/parallel/data/training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.train_iters=50 (repeatable)")
    args = parser.parse_args(argv)

    from nvium_dist import exit_codes
    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.cli import quiet_training_noise
    from nvium_dist.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        report_config_error(error)
        return exit_codes.CONFIG_ERROR
    quiet_training_noise(config.parallel.device)
    from nvium_dist.training.beta_controller import BaselineUnavailable
    from nvium_dist.training.checkpoint import RankZeroError
    from nvium_dist.training.fault import DivergedError
    from nvium_dist.training.run_lock import RunDirInUseError
    from nvium_dist.training.trainer import Trainer

    try:
        return Trainer(config).train()
    except DivergedError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank decided the same
            print(f"error: {error}", file=sys.stderr)
        return exit_codes.DIVERGED
    except ConfigError as error:
        report_config_error(error)
    except RankZeroError:
        pass  # rank 0 reports it
    except (BaselineUnavailable, CheckpointError, RunDirInUseError, OSError, ValueError) as error:
        # OSError: a path that is missing, not writable or of the wrong kind; ValueError: data that does not fit
        # (format, tokenizer, vocabulary, blend)
        print(f"error: {error}", file=sys.stderr)
    return exit_codes.CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
