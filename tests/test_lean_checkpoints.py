"""Checkpoints at scale: every rank writes and reads only its own share, the manifest is what the ranks
report writing, and training.async_save writes in the background. The real trainer in gloo processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributed_runner import run_distributed
from nvium_dist.checkpoint_io import CheckpointError, verify_manifest
from trainer_fixtures import ROOT, corpus, read_metrics, small_overrides, train  # noqa: F401

# wide for its vocabulary and short sequences, so the state, not the sample check's logits, sets the bound
SHAPE = {"model.hidden_size": 128, "model.ffn_hidden_size": 256, "model.seq_length": 16,
         "training.micro_batch_size": 2, "training.global_batch_size": 8, "training.eval_iters": 1}
TP2_PP2 = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2, "parallel.zero_stage": 1}


def _measured(rank, world_size, overrides):
    from nvium_dist.training.checkpoint_memory import measured_training

    return measured_training(None, overrides)


def test_save_and_resume_stay_within_each_ranks_shard(corpus, tmp_path):  # noqa: F811
    """World 4: ZeRO-2 over 4 ranks trains a step and saves; TP=2 x PP=2 resumes from that checkpoint (a new
    layout: every rank reads its slices) and saves at step 2. Every rank's extra memory for each save and the
    resume stays within 1.25 x its own 12-byte/parameter shard + the largest tensor (the old save gathered
    the whole state on every rank: 4x the shard). The result still exports and self-checks."""
    run = tmp_path / "run"
    zero2 = run_distributed(_measured, 4, small_overrides(corpus, run, **SHAPE, **{
        "training.train_iters": 1, "parallel.zero_stage": 2}))
    tp_pp = run_distributed(_measured, 4, small_overrides(corpus, run, **SHAPE, **TP2_PP2, **{
        "training.train_iters": 2}))
    for layout, ranks in (("zero2", zero2), ("tp2-pp2", tp_pp)):
        for r in ranks:
            print(f"{layout} rank {r['rank']}: save {r['save']} resume {r['resume']} shard {r['shard']} "
                  f"bound {r['bound']} bytes {r['parts']}")
            assert 0 < r["save"] <= r["bound"]
    assert all(0 < r["resume"] <= r["bound"] for r in tp_pp)
    records, _ = read_metrics(run)
    assert sorted(records) == [1, 2]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint", str(run),
                           "--output", str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "self-check" in done.stdout


def _save_with_a_stale_listing(rank, world_size, overrides):
    """Rank 0 lists directories as NFS may right after other nodes wrote: without the other ranks' files."""
    from nvium_dist import checkpoint_io
    from nvium_dist.training import checkpoint
    from trainer_fixtures import train_in_process

    if rank == 0:
        listing = checkpoint_io.list_files

        def stale(step_dir):
            return [name for name in listing(step_dir) if "rank_0000" not in name or "rank_00000" in name]
        checkpoint_io.list_files = stale
        if hasattr(checkpoint, "list_files"):
            checkpoint.list_files = stale
    return train_in_process(rank, world_size, overrides)


def test_manifest_lists_what_every_rank_wrote_and_refuses_a_planted_file(corpus, tmp_path):  # noqa: F811
    run_distributed(_save_with_a_stale_listing, 2, small_overrides(corpus, tmp_path, **{
        "training.train_iters": 2, "parallel.zero_stage": 2}))
    step = tmp_path / "checkpoints" / "step_00000002"
    listed = json.loads((step / "manifest.json").read_text())["files"]
    assert "rng/rank_00001.pt" in listed  # written by rank 1, which rank 0's listing did not show
    assert any("zero_pp_rank_1" in name for name in listed)
    verify_manifest(step)
    (step / "deepspeed" / "notes.txt").write_text("planted")
    with pytest.raises(CheckpointError, match="manifest does not list"):
        verify_manifest(step)


@pytest.mark.parametrize("layout", [{"parallel.zero_stage": 2}, TP2_PP2 | {"parallel.tensor_parallel": 1}],
                         ids=["dp2-zero2", "pp2-zero1"])
def test_async_save_writes_the_same_checkpoint_in_the_background(layout, corpus, tmp_path):  # noqa: F811
    """Checkpoints at steps 2 and 4 written by the background thread while steps 3-4 train are byte-identical
    in weights and moments to synchronous saves (the host copy is the state at the save's step), and a
    resume from the async step-2 checkpoint (DeepSpeed's files, same layout) continues the run."""
    settings = {"training.train_iters": 4, "training.save_interval": 2, **layout}
    sync_records, _, _ = train(2, corpus, tmp_path / "sync", **settings)
    async_records, _, _ = train(2, corpus, tmp_path / "async", **settings, **{"training.async_save": "true"})
    for step in ("step_00000002", "step_00000004"):
        for name in ("model.safetensors", "optimizer.safetensors"):
            ours = (tmp_path / "async" / "checkpoints" / step / name).read_bytes()
            assert ours == (tmp_path / "sync" / "checkpoints" / step / name).read_bytes(), (step, name)
        verify_manifest(tmp_path / "async" / "checkpoints" / step)
    assert [async_records[s]["loss"] for s in (1, 2, 3, 4)] == [sync_records[s]["loss"] for s in (1, 2, 3, 4)]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "async" / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    records, _, resumed_step = train(2, corpus, resumed, **settings, **{"training.async_save": "true"})
    assert resumed_step == 2 and sorted(records) == [3, 4]
    assert abs(records[4]["loss"] - sync_records[4]["loss"]) < 1e-6


KILLED_DURING_BACKGROUND_WRITE = textwrap.dedent("""
    import os, signal, sys, threading
    from nvium_dist.config import load_config
    from nvium_dist.parallel import free_port
    from nvium_dist.training import sharded_state
    from nvium_dist.training.trainer import Trainer

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    write = sharded_state.OwnedPieces.write

    def write_then_die(self, directory):
        if directory.name == ".tmp_step_00000004":
            assert threading.current_thread().name == "nvium-checkpoint-writer"
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, directory)

    sharded_state.OwnedPieces.write = write_then_die
    Trainer(load_config(None, sys.argv[1:])).train()
""")


def test_kill_during_a_background_write_keeps_the_previous_checkpoint(corpus, tmp_path):  # noqa: F811
    settings = {"training.train_iters": 4, "training.save_interval": 2, "training.async_save": "true"}
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", KILLED_DURING_BACKGROUND_WRITE,
                           *small_overrides(corpus, tmp_path, **settings)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert (checkpoints / ".tmp_step_00000004").is_dir() and not (checkpoints / "step_00000004").exists()
    _, _, resumed_step = train(1, corpus, tmp_path, **settings)
    assert resumed_step == 2
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    verify_manifest(checkpoints / "step_00000004")
    assert not list(checkpoints.glob(".tmp_*"))
