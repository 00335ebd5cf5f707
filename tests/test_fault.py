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


FILE_SIZE_LIMIT = 64 * 1024  # above what rank 1 logs, below its share of a checkpoint


def pretrain_cli_rank1_small_files(rank, world_size, args, log_dir):
    """pretrain_cli where rank 1 can write no file past FILE_SIZE_LIMIT bytes (RLIMIT_FSIZE): its share of a
    checkpoint fails with EFBIG, like a full disk on its node, while rank 0 writes on. SIGXFSZ is ignored, so
    the write fails instead of killing the process."""
    import resource

    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    return pretrain_cli(rank, world_size, args, log_dir)


def cli_args(corpus, run_dir: Path, **settings) -> list[str]:
    """pretrain_nvium.py's arguments: tiny.yaml at the small test shape."""
    overrides = small_overrides(corpus, run_dir, **settings)
    return ["--config", str(ROOT / "pretrain" / "configs" / "tiny.yaml")] + [a for o in overrides for a in ("--set", o)]


def pretrain(corpus, run_dir: Path, world_size: int = 2, target=pretrain_cli, timeout: float = 600,
             **settings) -> tuple[list[int], str]:
    """The trainer CLI (`target`) on `world_size` forkserver ranks -> (exit codes by rank, rank 0's output)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    codes = run_distributed(target, world_size, cli_args(corpus, run_dir, **settings), str(run_dir), timeout=timeout)
    return codes, (run_dir / "rank0.log").read_text()


def start_pretrain(corpus, run_dir: Path, world_size: int, **settings) -> tuple[list, object]:
    """pretrain_cli on `world_size` forkserver ranks, left running -> (their processes, the queue their
    results arrive on)."""
    from distributed_runner import _PRELOAD, _worker
    from nvium_dist.parallel import forkserver_context, free_port

    args = cli_args(corpus, run_dir, **settings)
    context = forkserver_context(_PRELOAD)
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_worker, args=(pretrain_cli, rank, world_size, port, (args, str(run_dir)), results))
             for rank in range(world_size)]
    for process in ranks:
        process.start()
    return ranks, results


def wait_for_records(run_dir: Path, ranks: list, ready, what: str) -> None:
    """Until `ready(records of metrics.jsonl)`; fails with rank 0's log if a rank exits first or 300 s pass."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and ready([json.loads(line) for line in metrics.read_text().splitlines()])):
        assert time.monotonic() < deadline, f"training did not reach {what}"
        assert all(p.is_alive() for p in ranks), (run_dir / "rank0.log").read_text()
        time.sleep(0.5)


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


def test_after_max_rollbacks_the_trainer_stops_with_its_exit_code(corpus, tmp_path):
    """Every batch from 3 on is poisoned: steps 3-4 skip, rollback 1 goes back to step 2 past 2 batches, steps
    3-4 (batches 5-6) skip again, and with max_rollbacks=1 the run stops: exit code DIVERGED on every rank."""
    codes, output = pretrain(corpus, tmp_path, **{
        "training.inject_loss_batches": str(list(range(3, 40))), "training.inject_loss_rank": 0,
        "training.train_iters": 20, "training.save_interval": 2, "training.eval_interval": 2,
        "training.max_skipped_steps": 2, "training.rollback_skip_batches": 2, "training.max_rollbacks": 1})
    assert codes == [exit_codes.DIVERGED] * 2, output
    assert "rollback 1 of at most 1: step 4 -> step_00000002 (step 2)" in output
    assert ("error: training diverged: 2 steps in a row skipped at step 4 after 1 rollback(s) "
            "(training.max_rollbacks=1)") in output
    _, state = final_weights(tmp_path)
    assert state["step"] == 2  # nothing of the diverged steps was saved


def test_loss_spike_guard_skips_the_spiking_step(corpus, tmp_path):
    """Rank 1's loss times 100 on batch 6: above mean + 6 std of the last 4 steps, so step 6 is skipped."""
    codes, output = pretrain(corpus, tmp_path, **{
        "training.inject_loss_batches": "[6]", "training.inject_loss_rank": 1, "training.inject_loss_scale": 100.0,
        "training.loss_spike_window": 4, "training.loss_spike_sigmas": 6.0, "training.train_iters": 7})
    assert codes == [0, 0], output
    records, _ = read_metrics(tmp_path)
    assert [step for step, r in records.items() if r["skipped"]] == [6]
    assert records[6]["skip_reason"].startswith("loss spike: ")
    assert "[fault] step 6 skipped: loss spike" in output


def test_diverging_learning_rate_no_longer_exits_0(corpus, tmp_path):
    """The issue's user story (tiny.yaml with lr=1e4) at the small test shape: every step from the second on
    is non-finite, there is no good checkpoint to roll back to, and the run says so with exit code DIVERGED
    instead of saving a dead model and exiting 0."""
    codes, output = pretrain(corpus, tmp_path, world_size=1, **{
        "training.lr": 1e4, "training.train_iters": 30, "training.save_interval": 10, "parallel.zero_stage": 2})
    assert codes == [exit_codes.DIVERGED], output
    assert "there is no good checkpoint to roll back to" in output
    assert not (tmp_path / "checkpoints").exists()


def test_the_guard_names_a_deepspeed_without_its_hook():
    """The guard gates a private DeepSpeed method; a version without it is one clear error, not an
    AttributeError mid-setup."""
    from nvium_dist.config import TrainingConfig
    from nvium_dist.training.fault import DivergenceGuard

    class EngineOfAnotherVersion:
        pass

    with pytest.raises(ValueError, match=r"_take_model_step, which deepspeed .* does not have; install the version"):
        DivergenceGuard(TrainingConfig(), rank=0).install(EngineOfAnotherVersion(), lambda: torch.zeros(()))


def test_resume_refuses_non_finite_weights_and_evaluations(corpus, tmp_path, capsys):
    """A checkpoint that verifies against its manifest but holds NaN weights, or whose last evaluation was NaN,
    is passed over for the previous one; with none left the choice is an error naming the NaN."""
    from safetensors.torch import load_file, save_file

    from nvium_dist.checkpoint_io import CheckpointError, write_manifest
    from nvium_dist.config import load_config
    from nvium_dist.training.checkpoint import choose_checkpoint

    settings = {"training.train_iters": 3, "training.save_interval": 1, "training.eval_interval": 1}
    codes, output = pretrain(corpus, tmp_path, world_size=1, **settings)
    assert codes == [0], output
    config = load_config(None, small_overrides(corpus, tmp_path, **settings))
    root = tmp_path / "checkpoints"
    weights = load_file(str(root / "step_00000003" / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, str(root / "step_00000003" / "model.safetensors"), metadata={"format": "pt"})
    state_file = root / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(dict(state, last_eval_ce=float("nan"))))
    for step in (2, 3):
        write_manifest(root / f"step_{step:08d}")  # both verify: only their contents are bad

    assert choose_checkpoint(tmp_path, config) == root / "step_00000001"
    warnings = capsys.readouterr().err
    assert f"{name} holds NaN or infinite values" in warnings
    assert "its last evaluation (ce nan) was not finite" in warnings
    (root / "step_00000001" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        choose_checkpoint(tmp_path, config)


@pytest.mark.parametrize("world_size", [2, 4])
def test_watchdog_ends_every_rank_when_one_freezes(corpus, tmp_path, world_size):
    """SIGSTOP one rank mid-training: every other rank, stuck in a collective, dumps its threads' stacks, names
    its rank, step and phase in one line and exits with exit code HUNG within hang_timeout_s + 60 s."""
    import queue as queue_module

    hang_timeout = 10
    ranks, results = start_pretrain(corpus, tmp_path, world_size, **{
        "training.train_iters": 10_000, "training.eval_interval": 10_000, "training.save_interval": 10_000,
        "training.global_batch_size": 4 * world_size, "training.hang_timeout_s": hang_timeout})
    frozen = ranks[1]
    try:
        wait_for_records(tmp_path, ranks, lambda records: len(records) >= 3, "step 3")
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        for process in ranks:
            if process is not frozen:
                process.join(timeout=max(1.0, stopped + hang_timeout + 60 - time.monotonic()))
        waited = time.monotonic() - stopped
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()
    with pytest.raises(queue_module.Empty):
        results.get(timeout=0.1)  # no rank finished normally
    for rank, process in enumerate(ranks):
        if process is frozen:
            continue
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert process.exitcode == exit_codes.HUNG, log
        # the first ranks to notice hang; the others may see those exit and lose them as peers first
        hung = re.search(rf"\[watchdog\] rank {rank} hung in step at step \d+: no progress for \d+ s "
                         rf"\(training.hang_timeout_s={hang_timeout}\); stacks above; exiting with code 75", log)
        lost = re.search(rf"\[watchdog\] rank {rank} lost a peer in step at step \d+: .*Connection .*; "
                         "exiting with code 75", log)
        assert hung or lost, log
        if hung:
            assert "most recent call first" in log  # faulthandler's dump of the stuck thread
    assert waited < hang_timeout + 60
    assert any(re.search(r"\[watchdog\] rank \d hung", (tmp_path / f"rank{r}.log").read_text())
               for r in range(world_size))


def test_the_batch_script_requeues_exactly_the_requeue_exit_codes():
    """slurm/pretrain.sbatch cannot import nvium_dist/exit_codes.py; its copy of the code must agree."""
    script = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    assert re.findall(r"^HUNG_EXIT=(\d+)$", script, re.M) == [str(exit_codes.HUNG)]
    assert exit_codes.REQUEUE == (exit_codes.HUNG,)
    assert len({exit_codes.OK, exit_codes.ERROR, exit_codes.CONFIG_ERROR, exit_codes.DIVERGED, exit_codes.HUNG}) == 5


def test_preemption_of_a_non_finite_model_says_no_checkpoint_was_written(corpus, tmp_path):
    """Rank 1's weights turn NaN after step 3 (training.inject_nan_weights_step), so every later step is skipped
    (max_skipped_steps=0: no rollback) and the periodic save of step 4 waits. SIGUSR1 then stops the run: its
    save is refused, and the stop line says so and names step 2, the checkpoint a restart resumes from, instead
    of claiming a checkpoint of the stop step."""
    from nvium_dist.parallel import get_result

    ranks, results = start_pretrain(corpus, tmp_path, 2, **{
        "training.train_iters": 10_000, "training.eval_interval": 10_000, "training.save_interval": 2,
        "training.max_skipped_steps": 0, "training.inject_nan_weights_step": 3, "training.inject_loss_rank": 1})
    try:
        wait_for_records(tmp_path, ranks, lambda records: any(r.get("skipped") for r in records), "a skipped step")
        os.kill(ranks[0].pid, signal.SIGUSR1)
        codes = dict(get_result(results, timeout=120)[::2] for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    output = (tmp_path / "rank0.log").read_text()
    assert codes == {0: 0, 1: 0}, output
    assert "preempted: checkpoint saved" not in output
    stops = re.findall(r"^preempted: no checkpoint written at step (\d+) \(non-finite weights or evaluation\); "
                       r"the restart resumes from step 2$", output, re.M)
    assert len(stops) == 1, output
    assert int(stops[0]) > 3
    assert f"[fault] step {stops[0]}: the model is not finite" in output
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"


def sbatch_functions(*names: str) -> str:
    """The definitions of these shell functions in slurm/pretrain.sbatch (one-line, or up to a line "}")."""
    script = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    found = [re.search(rf"^{name}\(\) \{{(?: [^\n]*; \}}|\n.*?\n\}})$", script, re.M | re.S) for name in names]
    assert all(found), names
    return "\n".join(match.group(0) for match in found)


@pytest.mark.parametrize("checkpoint", ["saved", "refused", "none"])
def test_the_batch_script_requeues_after_either_preemption_line(tmp_path, checkpoint):
    """pretrain.sbatch's own stopped_early, over a node log whose earlier run (before this run's offset) said
    preempted: the trainer's stop line requeues whether its save was written or refused; no line, no requeue."""
    import subprocess
    from types import SimpleNamespace

    from nvium_dist.training.trainer import Trainer

    trainer = SimpleNamespace(step=7, good_checkpoint_step=4)
    lines = {"saved": Trainer._preemption_line(trainer, tmp_path / "step_00000007"),
             "refused": Trainer._preemption_line(trainer, None), "none": "[train] step 40 of 40"}
    earlier = Trainer._preemption_line(trainer, tmp_path / "step_00000007") + "\n"
    log = tmp_path / "node1.log"
    log.write_text(earlier + f"[setup] resumed\n{lines[checkpoint]}\n")
    functions = sbatch_functions("this_run_logged", "stopped_early")
    script = f"declare -A log_offsets=([{log}]={len(earlier)})\n{functions}\nstopped_early"
    requeues = subprocess.run(["bash", "-c", script]).returncode == 0
    assert requeues == (checkpoint != "none"), lines[checkpoint]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_checkpoint_write_failing_on_one_rank_ends_every_rank_promptly(corpus, tmp_path, async_save):
    """A run saves step 20. Resumed with rank 1 unable to write any file past 64 KiB, its save of step 40 fails
    on rank 1 alone (DeepSpeed's optimizer file). Every rank learns of it at the save's agreement point and exits
    with exit code 2 and the same error line naming rank 1, in seconds rather than the collective timeout;
    `latest` still names step 20 and nothing of step 40 stays. A background save's failure ends the run within
    a few steps, long before the next save (step 60) would have waited for it."""
    settings = {"parallel.zero_stage": 1, "training.save_interval": 20, "training.eval_interval": 1000,
                "training.async_save": async_save}
    codes, output = pretrain(corpus, tmp_path, **settings, **{"training.train_iters": 20})
    assert codes == [0, 0], output
    started = time.monotonic()
    codes, _ = pretrain(corpus, tmp_path, target=pretrain_cli_rank1_small_files, timeout=300,
                        **settings, **{"training.train_iters": 1000})
    assert time.monotonic() - started < 150  # seconds (about 20 unloaded), not the 30-minute collective timeout
    assert codes == [exit_codes.CONFIG_ERROR] * 2
    records, _ = read_metrics(tmp_path)
    assert (max(records) == 40) if not async_save else (40 < max(records) < 60), sorted(records)
    root = tmp_path / "checkpoints"
    errors = []
    for rank in (0, 1):
        log = (tmp_path / f"rank{rank}.log").read_text()
        errors.append([line for line in log.replace("\r", "\n").splitlines() if line.startswith("error: ")])
        assert len(errors[-1]) == 1, log
    assert errors[0] == errors[1]
    # torch.save reports the failed write as "unexpected pos", which reads as a full disk
    assert errors[0][0].startswith("error: checkpoint step_00000040 was not written: rank 1 could not write its share "
                                   f"(no space left on the device writing {root / '.tmp_step_00000040'} ("), errors
    assert errors[0][0].endswith(f"{root / 'latest'} still names the last good checkpoint (step_00000020)"), errors
    assert (root / "latest").read_text().strip() == "step_00000020"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000020"]


def _train_with_latest_unwritable_at(rank, world_size, overrides, step_dir):
    """The trainer with `latest` failing to update to `step_dir` (its disk gone read-only after the rename)."""
    from nvium_dist.training import checkpoint
    from trainer_fixtures import train_in_process

    update_latest = checkpoint.update_latest

    def failing(root, name):
        if name == step_dir:
            raise OSError(30, "Read-only file system", str(Path(root) / "latest"))
        update_latest(root, name)
    checkpoint.update_latest = failing
    try:
        return train_in_process(rank, world_size, overrides)
    except Exception as err:  # noqa: BLE001 - the error line is the result
        return str(err)


def test_a_save_whose_latest_update_fails_leaves_no_step_behind(corpus, tmp_path):
    """The step directory is already renamed into place when `latest` fails to name it: the save fails on
    every rank with one line, and the step goes again, so the checkpoints are exactly the ones `latest` can
    name and a restart cannot resume from a checkpoint the error called not written."""
    errors = run_distributed(_train_with_latest_unwritable_at, 2, small_overrides(corpus, tmp_path, **{
        "training.train_iters": 4, "training.save_interval": 2, "parallel.zero_stage": 1}), "step_00000004")
    root = tmp_path / "checkpoints"
    assert errors[0] == errors[1]
    assert errors[0].startswith("checkpoint step_00000004 was not written: rank 0 could not publish it"), errors
    assert "Read-only file system" in errors[0]
    assert errors[0].endswith(f"{root / 'latest'} still names the last good checkpoint (step_00000002)"), errors
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
