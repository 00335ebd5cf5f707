"""Divergence (skip, roll back, stop) and hangs (watchdog), on real gloo processes and DeepSpeed engines."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_fixtures import ROOT, corpus, read_metrics, small_overrides  # noqa: F401 - corpus is a fixture

from distributed_runner import run_distributed
from nvium_dist import exit_codes

# constant LR, no router warmup: a run that skips batches then equals one that never trained on them
STEADY = {"training.min_lr_ratio": 1.0, "training.warmup_fraction": 0.0, "training.router_warmup_steps": 0,
          "training.router_warmup_fraction": 0.0, "training.save_interval": 4, "training.eval_interval": 4,
          "training.keep_checkpoints": 0, "training.inject_loss_rank": 1}
LAYOUTS = {
    "tp2": {"parallel.tensor_parallel": 2},
    "pp2": {"parallel.pipeline_parallel": 2},
    "zero1": {"parallel.zero_stage": 1},
    "zero2": {"parallel.zero_stage": 2},
    "zero3": {"parallel.zero_stage": 3},
}


def pretrain_cli(rank, world_size, args, log_dir):
    """run_distributed target: pretrain/pretrain_nvium.py's main with this rank's stdout/stderr in a file."""
    import importlib.util

    log = open(Path(log_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    spec = importlib.util.spec_from_file_location("pretrain_nvium", ROOT / "pretrain" / "pretrain_nvium.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def pretrain(corpus, run_dir: Path, world_size: int = 2, **settings) -> tuple[list[int], str]:
    """The trainer CLI on `world_size` forkserver ranks -> (exit codes by rank, rank 0's output)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = small_overrides(corpus, run_dir, **settings)
    args = ["--config", str(ROOT / "pretrain" / "configs" / "tiny.yaml")]
    for override in overrides:
        args += ["--set", override]
    codes = run_distributed(pretrain_cli, world_size, args, str(run_dir), timeout=600)
    return codes, (run_dir / "rank0.log").read_text()


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    return load_file(str(latest / "model.safetensors")), state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_skip_then_rollback_equals_a_run_that_never_trained_on_the_poisoned_batches(corpus, tmp_path, layout):
    """Rank 1's loss is NaN on global batches 5 and 6. Run A skips steps 5 and 6 (max_skipped_steps=2), rolls
    back to step 4 and skips 2 batches, so its steps 5-8 train on batches 7-10. Run B only skips (no rollback)
    and trains to step 10: its updates saw the same batches, so the weights must be equal bit for bit."""
    settings = {**STEADY, **LAYOUTS[layout], "training.inject_loss_batches": "[5,6]"}
    codes, output = pretrain(corpus, tmp_path / "a", **settings, **{
        "training.train_iters": 8, "training.max_skipped_steps": 2, "training.rollback_skip_batches": 2})
    assert codes == [0, 0], output
    assert len(re.findall(r"\[fault\] step \d+ skipped: non-finite loss or gradients on [12] rank", output)) == 1, output
    assert "[fault] step 5 skipped" in output
    assert "rollback 1 of at most 3: step 6 -> step_00000004 (step 4), skipping the next 2 global batches" in output
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [5, 6], skipped
    rollbacks = [r for r in records if "rollback" in r]
    assert [(r["step"], r["diverged_at"], r["consumed_samples"]) for r in rollbacks] == [(4, 6, 48)]
    weights_a, state_a = final_weights(tmp_path / "a")
    assert (state_a["step"], state_a["consumed_samples"], state_a["rollbacks"]) == (8, 80, 1)

    codes, output = pretrain(corpus, tmp_path / "b", **settings, **{
        "training.train_iters": 10, "training.max_skipped_steps": 0})
    assert codes == [0, 0], output
    weights_b, state_b = final_weights(tmp_path / "b")
    assert (state_b["step"], state_b["consumed_samples"], state_b["skipped_steps"]) == (10, 80, 2)
    differing = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not differing, differing
