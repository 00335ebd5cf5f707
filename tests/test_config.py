"""Config input a careless or hostile user writes: every mistake is a one-line ConfigError naming the field."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nvium_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override, message", [
    ("training.train_iters=true", "training.train_iters must be int, got True"),
    ("training.lr=true", "training.lr must be a finite float, got True"),
    ("training.lr=.nan", "training.lr must be a finite float, got nan"),
    ("training.lr=0", "training.lr must be > 0"),
    ("training.save_interval=0", "training.save_interval must be > 0"),
    ("training.eval_interval=-3", "training.eval_interval must be > 0"),
    ("training.log_interval=0", "training.log_interval must be > 0"),
    ("training.eval_iters=0", "training.eval_iters must be > 0"),
    ("training.global_batch_size=0", "training.global_batch_size must be > 0"),
    ("training.micro_batch_size=-2", "training.micro_batch_size must be > 0"),
    ("training.warmup_fraction=1.5", "training.warmup_fraction must be in [0, 1]"),
    ("training.min_lr_ratio=-0.1", "training.min_lr_ratio must be in [0, 1]"),
    ("training.beta=-1", "training.beta must be >= 0"),
    ("training.adam_beta2=1", "training.adam_beta2 must be in [0, 1)"),
    ("training.keep_checkpoints=-1", "training.keep_checkpoints must be >= 0"),
    ("training.max_rollbacks=-1", "training.max_rollbacks must be >= 0"),
    ("training.hang_timeout_s=-5", "training.hang_timeout_s must be >= 0"),
    ("training.loss_spike_sigmas=0", "training.loss_spike_sigmas must be > 0"),
    ("training.inject_loss_batches=[0]", "training.inject_loss_batches must be global batch numbers >= 1"),
    ("training.seed=-1", "training.seed must be in [0, 2**32)"),
    ("training.beta_controller.beta_max=-1", "beta_max=-1.0 is below beta_min=0.0"),
    ("model.router_hidden_ratio=0", "model.router_hidden_ratio must be > 0"),
    ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by must be > 0"),
    ("model.norm_eps=0", "model.norm_eps must be > 0"),
    ("parallel.grad_reduce_dtype=fp16", "parallel.grad_reduce_dtype must be fp32 or bf16, got 'fp16'"),
    ("parallel.reduce_bucket_size=0", "parallel.reduce_bucket_size must be > 0"),
    ("training.optimizer=fused", "training.optimizer must be auto, torch or deepspeed, got 'fused'"),
    ("training.lr=[", "--set training.lr=[: invalid YAML at line 1"),
])
def test_out_of_range_values_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_duplicate_keys_and_yaml_syntax_errors_name_the_line(tmp_path):
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("training:\n  train_iters: 50\nmodel:\n  hidden_size: 64\ntraining:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 5, column 1: duplicate key 'training'"):
        load_config(duplicated)
    inner = tmp_path / "inner.yaml"
    inner.write_text("training:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="line 3, column 3: duplicate key 'lr'"):
        load_config(inner)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  exits: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3"):
        load_config(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        load_config(binary)


def test_pretrain_cli_reports_a_bad_config_in_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("training:\n  lr: 0.1\ntraining:\n  seed: 3\n")
    done = subprocess.run([sys.executable, str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config", str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"config error: {broken}: invalid YAML at line 3, column 1: "
                                                     "duplicate key 'training' (each key may appear once per section)")
