"""The trainer in real gloo processes: parallel layouts agree, resume is exact, bad state fails clearly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_runner import run_distributed
from nvium_dist.config import BetaControllerConfig
from nvium_dist.training.beta_controller import BaselineUnavailable, BetaController
from trainer_fixtures import ROOT, corpus, read_metrics, small_overrides, train  # noqa: F401

# Losses (~6 nats) agree to ~2e-7 across layouts: fp32 sums in another order; 1e-5 leaves a 50x margin.
TOLERANCE = 1e-5
# Weights are compared relative to the update the run made: Adam divides each gradient by its running RMS, so
# a rounding difference in a near-zero gradient moves that weight by up to ~lr per step on one CPU and not on
# another (an absolute 1e-5 was crossed at 1.1e-5). A layout that is wrong anywhere (a shard swapped, stale,
# or off by 1%) moves a whole tensor's update by far more than 0.1%.
RELATIVE_UPDATE_TOLERANCE = 1e-3
# chunks of 100 tokens: a micro-batch of 4 x 64 tokens runs as 100 + 100 + 56
MEMORY_SAVERS = {"training.activation_checkpointing": "true", "training.loss_chunk_tokens": 100}


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """One process, ZeRO-0, gradient accumulation 2 (micro-batch 4, global batch 8)."""
    run_dir = tmp_path_factory.mktemp("reference")
    records, evals, _ = train(1, corpus, run_dir)
    return records, evals, run_dir


def initial_weights(config) -> dict[str, torch.Tensor]:
    """The full weights every layout starts from (a function of seed and parameter name only)."""
    from nvium_dist.model import NviumModel
    from nvium_dist.tp_layout import gather_full_state_dict

    return gather_full_state_dict(NviumModel(config.model, seed=config.training.seed))


def relative_update_errors(ours, theirs, initial) -> dict[str, float]:
    """Per tensor: |ours - theirs| / |theirs - initial| (Frobenius norms): how far from the reference update."""
    return {name: ((ours[name] - theirs[name]).norm() / (theirs[name] - initial[name]).norm().clamp_min(1e-30)).item()
            for name in theirs}


def assert_same_final_weights(run_dir, reference_dir, what, ours=None):
    """The layout-independent weights each layout gathers into its final checkpoint match one process's."""
    from nvium_dist.checkpoint_io import read_checkpoint

    config, theirs, _, _ = read_checkpoint(reference_dir)
    if ours is None:
        _, ours, _, state = read_checkpoint(run_dir)
        assert state["step"] == 5
    assert sorted(ours) == sorted(theirs)
    errors = relative_update_errors(ours, theirs, initial_weights(config))
    worst = max(errors, key=errors.get)
    print(f"{what}: worst weight error {errors[worst]:.2e} of the update ({worst})")
    assert errors[worst] < RELATIVE_UPDATE_TOLERANCE, (what, worst, errors[worst])


def assert_same_losses(records, reference_records, what):
    diffs = [abs(records[s]["loss"] - reference_records[s]["loss"]) for s in range(1, 6)]
    print(f"{what}: max |loss diff| over 5 steps = {max(diffs):.2e}")
    assert max(diffs) < TOLERANCE, (what, diffs)


def test_reference_run_is_complete(reference):
    records, evals, _ = reference
    assert sorted(records) == [1, 2, 3, 4, 5]
    for key in ("loss", "lm_loss", "depth_loss", "lr", "beta", "tokens_per_s", "consumed_samples"):
        assert key in records[5]
    assert records[5]["consumed_samples"] == 40
    # one process runs the lean path (ZeRO-0, no all-reduce) and still logs DeepSpeed's clip norm
    assert all(records[step]["grad_norm"] > 0 for step in records)
    assert records[1]["router_warmup"] and not records[5]["router_warmup"]
    final = evals[-1]
    for key in ("eval_ce", "eval_ppl", "head_ce", "exit_usage", "expected_depth", "ideal_speedup"):
        assert key in final
    assert abs(sum(final["exit_usage"]) - 1) < 1e-6 and len(final["head_ce"]) == 4


@pytest.mark.parametrize("layout", [
    pytest.param({"parallel.tensor_parallel": 2}, id="tp2"),
    pytest.param({"parallel.zero_stage": 0}, id="dp2-zero0"),
    pytest.param({"parallel.zero_stage": 1}, id="dp2-zero1", marks=pytest.mark.slow),
    pytest.param({"parallel.zero_stage": 2}, id="dp2-zero2"),
    pytest.param({"parallel.zero_stage": 3}, id="dp2-zero3"),
    pytest.param({"parallel.tensor_parallel": 2, "parallel.zero_stage": 3}, id="tp2-zero3", marks=pytest.mark.slow),
    pytest.param({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1}, id="pp2-zero1"),
    pytest.param({"parallel.zero_stage": 3, **MEMORY_SAVERS}, id="dp2-zero3-checkpointed-chunked"),
])
def test_layouts_match_single_process(layout, corpus, reference, tmp_path):
    records, evals, _ = train(2, corpus, tmp_path, **layout)
    assert_same_losses(records, reference[0], str(layout))
    assert abs(evals[-1]["eval_ce"] - reference[1][-1]["eval_ce"]) < TOLERANCE
    assert_same_final_weights(tmp_path, reference[2], str(layout))


def test_tp2_x_pp2_matches_single_process(corpus, reference, tmp_path):
    """Tensor and pipeline parallelism together (4 processes), with per-block activation checkpointing
    (DeepSpeed's, under PP) and the chunked vocab loss, against one process."""
    records, evals, _ = train(4, corpus, tmp_path, **{"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2,
                                                   "parallel.zero_stage": 1, **MEMORY_SAVERS})
    assert_same_losses(records, reference[0], "TP=2 x PP=2")
    assert abs(evals[-1]["eval_ce"] - reference[1][-1]["eval_ce"]) < TOLERANCE
    assert_same_final_weights(tmp_path, reference[2], "TP=2 x PP=2")


def test_weight_comparison_fails_a_wrong_layout(reference):
    """The comparison above keeps its power: one shard of one tensor swapped, left at its initial value, or
    with a 1% larger update (what a wrong TP/ZeRO layout does) fails it; the reference itself passes."""
    from nvium_dist.checkpoint_io import read_checkpoint

    config, weights, _, _ = read_checkpoint(reference[2])
    initial = initial_weights(config)
    assert_same_final_weights(None, reference[2], "reference", ours=weights)
    name = "layers.1.mlp.up.weight"  # column-parallel: rows split across TP ranks
    half = weights[name].shape[0] // 2
    wrong = {"swapped shards": torch.cat([weights[name][half:], weights[name][:half]]),
             "stale shard": torch.cat([initial[name][:half], weights[name][half:]]),
             "1% off in one shard": torch.cat([initial[name][:half] + 1.01 * (weights[name] - initial[name])[:half],
                                               weights[name][half:]])}
    for what, tensor in wrong.items():
        with pytest.raises(AssertionError):
            assert_same_final_weights(None, reference[2], what, ours={**weights, name: tensor})


COMPILED = {"training.compile": "true"}


@pytest.mark.slow  # a cold inductor cache compiles for about a minute on 2 cores
def test_compiled_single_process_matches_eager_without_recompiling(corpus, reference, tmp_path):
    """training.compile: the same losses and weights as eager, and every graph compiled in the first step (the
    count in the metrics never grows after it)."""
    records, evals, _ = train(1, corpus, tmp_path, **COMPILED)
    assert_same_losses(records, reference[0], "compiled")
    assert abs(evals[-1]["eval_ce"] - reference[1][-1]["eval_ce"]) < TOLERANCE
    assert_same_final_weights(tmp_path, reference[2], "compiled")
    graphs = [records[step]["compiled_graphs"] for step in sorted(records)]
    assert graphs[0] > 0 and graphs == [graphs[0]] * len(graphs), graphs


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    pytest.param({"parallel.tensor_parallel": 2, "parallel.zero_stage": 3}, id="tp2-zero3"),
    pytest.param({"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1, **MEMORY_SAVERS}, id="pp2-checkpointed-chunked"),
    pytest.param({"parallel.zero_stage": 2, **MEMORY_SAVERS}, id="dp2-zero2-checkpointed-chunked"),
])
def test_compiled_layouts_match_single_process(layout, corpus, reference, tmp_path):
    """Each parallel layout and memory switch once under training.compile, against the eager single process
    (ZeRO-3 at TP=2, its one data-parallel rank: with more, the config refuses compile, tests/test_model.py)."""
    records, evals, _ = train(2, corpus, tmp_path, **layout, **COMPILED)
    assert_same_losses(records, reference[0], f"compiled {layout}")
    assert abs(evals[-1]["eval_ce"] - reference[1][-1]["eval_ce"]) < TOLERANCE
    assert_same_final_weights(tmp_path, reference[2], f"compiled {layout}")


@pytest.mark.slow
def test_dense_baseline_pipeline_matches_single_stage(corpus, tmp_path):
    dense = {"model.exits": "[]", "model.ffn_hidden_size": 136}
    reference_records, _, _ = train(1, corpus, tmp_path / "pp1", **dense)
    records, _, _ = train(2, corpus, tmp_path / "pp2", **dense, **{"parallel.pipeline_parallel": 2})
    assert_same_losses(records, reference_records, "dense PP=2 vs PP=1")


def test_aux_head_loss_is_applied_and_pipeline_matches_single_stage(corpus, reference, tmp_path):
    """The opt-in per-head loss through the trainer: PP=2 (its loss on the last stage, PipelineLoss) equals one
    process, the logged components add up, and it changes training (it is really applied)."""
    aux = {"training.aux_head_loss": 0.1}
    single, _, _ = train(1, corpus, tmp_path / "pp1", **aux)
    piped, _, _ = train(2, corpus, tmp_path / "pp2", **aux, **{"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1})
    assert_same_losses(piped, single, "aux_head_loss PP=2 vs PP=1")
    for records in (single, piped):
        r = records[5]  # after the router warmup: -log p_mix + beta E[depth] + 0.1 x mean per-head CE
        assert abs(r["loss"] - (r["lm_loss"] + r["beta"] * r["depth_loss"] + 0.1 * r["head_loss"])) < 1e-5
    assert abs(single[1]["loss"] - reference[0][1]["loss"] - 0.1 * single[1]["head_loss"]) < 1e-5
    assert abs(single[5]["lm_loss"] - reference[0][5]["lm_loss"]) > 1e-4  # different updates since step 1


def test_beta_controller_moves_with_the_gap(tmp_path):
    baseline = tmp_path / "dense_metrics.jsonl"
    baseline.write_text("\n".join(json.dumps(r) for r in [
        {"step": 100, "eval_ce": 3.0}, {"step": 200, "eval_ce": 2.5}, {"step": 195, "loss": 9.0}]) + "\nnot json\n")
    config = BetaControllerConfig(enabled=True, baseline_metrics=str(baseline), k_up=8, k_down=4, max_step=0.5,
                                  beta_min=0.0, beta_max=10.0)
    controller = BetaController(config, beta=1.0)
    assert controller.update(190, eval_ce=2.45) == pytest.approx(1.4)  # ahead by 0.05 -> +8*0.05
    assert controller.history[-1]["baseline_step"] == 200
    assert controller.update(110, eval_ce=3.02) == pytest.approx(1.32)  # behind by 0.02 -> -4*0.02
    assert controller.update(100, eval_ce=2.997) == pytest.approx(1.32)  # inside the dead band
    assert controller.update(100, eval_ce=1.0) == pytest.approx(1.82)  # step capped at max_step
    controller.beta = 9.9
    assert controller.update(100, eval_ce=1.0) == pytest.approx(10.0)  # capped at beta_max


def test_beta_controller_refuses_missing_or_stale_baselines(tmp_path):
    missing = BetaController(BetaControllerConfig(baseline_metrics=str(tmp_path / "none.jsonl")), beta=0.3)
    with pytest.raises(BaselineUnavailable, match="none.jsonl' does not exist"):
        missing.update(5, 1.0)
    baseline = tmp_path / "dense_metrics.jsonl"
    baseline.write_text(json.dumps({"step": 100, "loss": 3.0}) + "\n")
    growing = BetaController(BetaControllerConfig(baseline_metrics=str(baseline), max_step=0.5), beta=0.3,
                             max_lag=100)
    with pytest.raises(BaselineUnavailable, match="no evaluation yet"):
        growing.update(100, 1.0)
    baseline.write_text(json.dumps({"step": 100, "eval_ce": 3.0}) + "\n")
    assert growing.update(200, 2.0) == pytest.approx(0.8)  # 100 steps away: still fresh enough
    with pytest.raises(BaselineUnavailable, match="stale: its evaluation nearest to step 201 is at step 100"):
        growing.update(201, 2.0)
    assert growing.beta == pytest.approx(0.8) and len(growing.history) == 1


def _controller_worker(rank, world_size, paths):
    from nvium_dist.parallel import init_distributed
    from nvium_dist.config import ParallelConfig

    init_distributed(ParallelConfig())
    controller = BetaController(BetaControllerConfig(baseline_metrics=paths[rank]), beta=1.0)
    problem = controller.update_from_rank0(100, 2.0, rank)
    return controller.beta, controller.history, problem


def test_beta_controller_decides_on_rank0_only(tmp_path):
    """Each rank sees a different baseline file (as while the dense run appends to it): every rank ends with
    rank 0's decision, including rank 0's 'missing' verdict."""
    ahead, behind = tmp_path / "ahead.jsonl", tmp_path / "behind.jsonl"
    ahead.write_text(json.dumps({"step": 100, "eval_ce": 2.05}) + "\n")
    behind.write_text(json.dumps({"step": 100, "eval_ce": 1.9}) + "\n")
    results = run_distributed(_controller_worker, 2, [str(ahead), str(behind)])
    assert [r[0] for r in results] == [pytest.approx(1.4)] * 2 and results[0][1] == results[1][1]
    assert results[1][2] is None
    results = run_distributed(_controller_worker, 2, [str(tmp_path / "missing.jsonl"), str(behind)])
    assert [r[0] for r in results] == [1.0, 1.0]
    assert all("missing.jsonl' does not exist" in r[2] for r in results)


def test_missing_baseline_warns_at_every_evaluation_or_fails_when_strict(corpus, tmp_path):
    extra = {"training.train_iters": 2, "training.eval_interval": 1, "training.beta_controller.enabled": "true",
             "training.beta_controller.baseline_metrics": str(tmp_path / "dense" / "metrics.jsonl")}
    _, evals, _ = train(1, corpus, tmp_path / "warned", **extra)
    assert [e["step"] for e in evals] == [1, 2]
    assert all("metrics.jsonl' does not exist" in e["beta_controller_warning"] for e in evals)
    with pytest.raises(RuntimeError, match=r"beta controller at step 1: .*does not exist.*strict is true"):
        train(1, corpus, tmp_path / "strict", **extra, **{"training.beta_controller.strict": "true"})


def _torchrun(overrides, nproc=2, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(ROOT / "pretrain" / "pretrain_nvium.py"), "--config", str(ROOT / "pretrain/configs/tiny.yaml")]
    cmd += [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, **popen)


def _wait_for(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer exited with {proc.returncode} before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _workers(proc) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(corpus, tmp_path):
    extra = {"training.train_iters": 8, "training.save_interval": 4, "training.eval_interval": 8,
             "parallel.zero_stage": 2}
    uninterrupted, _, _ = train(2, corpus, tmp_path / "straight", **extra)
    run_dir = tmp_path / "killed"
    proc = _torchrun(small_overrides(corpus, run_dir, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run_dir / "checkpoints" / "step_00000004", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _torchrun(small_overrides(corpus, run_dir, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    records, _ = read_metrics(run_dir)
    diffs = [abs(records[s]["loss"] - uninterrupted[s]["loss"]) for s in range(5, 9)]
    print(f"SIGKILL resume: max |loss diff| steps 5-8 = {max(diffs):.2e}")
    assert max(diffs) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_checkpoints_and_resumes(signum, corpus, tmp_path):
    extra = {"training.train_iters": 30, "training.eval_interval": 30, "parallel.zero_stage": 1}
    uninterrupted, _, _ = train(2, corpus, tmp_path / "straight", **extra)
    run_dir = tmp_path / "signalled"
    proc = _torchrun(small_overrides(corpus, run_dir, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(metrics, proc)
    for pid in _workers(proc):
        os.kill(pid, signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"stopping early: {signal.Signals(signum).name} received" in out
    assert "preempted: checkpoint saved at step" in out
    stopped_at = int(out.split("preempted: checkpoint saved at step")[1].split()[0])
    assert stopped_at < 30
    resumed = _torchrun(small_overrides(corpus, run_dir, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"at step {stopped_at})" in out  # "[setup] run dir ... (resumed from .../step_N at step N)"
    records, _ = read_metrics(run_dir)
    assert sorted(records) == list(range(1, 31))
    assert max(abs(records[s]["loss"] - uninterrupted[s]["loss"]) for s in range(1, 31)) < 1e-6


def test_bf16_zero2_trains_resumes_exactly_and_exports(corpus, tmp_path):
    """bf16 on 2 processes with ZeRO-2 (DeepSpeed runs bf16 on CPU too): checkpoints hold the fp32 masters,
    a resume from step 3 repeats steps 4-6 exactly, and the export passes its bf16 self-check."""
    import shutil

    from safetensors.torch import load_file

    extra = {"parallel.dtype": "bf16", "parallel.zero_stage": 2, "training.train_iters": 6,
             "training.save_interval": 3, "training.eval_interval": 6, **MEMORY_SAVERS}
    straight, _, _ = train(2, corpus, tmp_path / "straight", **extra)
    assert straight[6]["loss"] < straight[1]["loss"]
    step3 = tmp_path / "straight" / "checkpoints" / "step_00000003"
    masters = load_file(step3 / "model.safetensors")
    assert {t.dtype for t in masters.values()} == {torch.float32}
    # fp32 masters, not the bf16 module weights upcast: most values are not representable in bf16
    off_grid = sum((t != t.bfloat16().float()).sum().item() for t in masters.values())
    assert off_grid > 0.5 * sum(t.numel() for t in masters.values())

    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(step3, resumed_dir / step3.name)
    (resumed_dir / "latest").write_text(step3.name + "\n")
    resumed, _, resumed_step = train(2, corpus, tmp_path / "resumed", **extra)
    assert resumed_step == 3 and sorted(resumed) == [4, 5, 6]
    assert [resumed[s]["loss"] for s in (4, 5, 6)] == [straight[s]["loss"] for s in (4, 5, 6)]

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_checkpoint.py"), "--checkpoint",
                           tmp_path / "resumed", "--output", tmp_path / "export"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in bfloat16 (tolerance 0.1)" in done.stdout
    worst = float(done.stdout.split("log p_mix ")[1].split()[0].rstrip(","))
    assert worst < 1e-3, done.stdout


def _masters_worker(rank, world_size, zero_stage, full_state, directory):
    """A bf16 DeepSpeed engine over the tiny model: its masters start as the bf16-rounded weights; after
    load_fp32_master_weights (from a model.safetensors) they are the given fp32 state, and the sharded save
    writes them back whole, each rank its own ZeRO partition."""
    import sys

    import deepspeed
    import torch.distributed as dist

    from nvium_dist.checkpoint_io import MODEL_FILE, load_tensors, save_tensors
    from nvium_dist.config import ModelConfig, NviumConfig, ParallelConfig
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import DeepSpeedMPU, init_distributed
    from nvium_dist.tp_layout import partition_dims
    from nvium_dist.training.checkpoint import load_fp32_master_weights
    from nvium_dist.training.sharded_state import save_files

    info = init_distributed(ParallelConfig(dtype="bf16", zero_stage=zero_stage))
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96, exits=[1],
                         make_vocab_size_divisible_by=64)
    model = NviumModel(config, seed=1)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters()), mpu=DeepSpeedMPU(),
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": zero_stage},
                "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    params, dims = dict(engine.module.named_parameters()), partition_dims(engine.module)
    source, saved = directory / "source", directory / "saved"
    if rank == 0:
        source.mkdir()
        saved.mkdir()
        save_tensors(source / MODEL_FILE, full_state)
    dist.barrier()
    before = {n: deepspeed.utils.safe_get_full_fp32_param(p) for n, p in params.items()}
    load_fp32_master_weights(params, dims, source, 0, 1, config.vocab_size)
    save_files(saved, engine, NviumConfig(model=config), params, dims, info, set()).write()
    dist.barrier()
    after = load_tensors(saved / MODEL_FILE)
    return {"before_off_grid": sum((t != t.bfloat16().float()).sum().item() for t in before.values()),
            "after_equal": all(torch.equal(after[n], full_state[n]) for n in full_state), "names": sorted(after)}


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_fp32_masters_are_written_and_restored_whole(zero_stage, tmp_path):
    """What a checkpoint of a bf16 run stores (the optimizer's fp32 masters, each data-parallel rank writing
    its partition) and what a resume into another layout restores: ZeRO-1 (DeepSpeed's BF16 optimizer), 2, 3."""
    from nvium_dist.config import ModelConfig, ParallelConfig
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict

    init_distributed(ParallelConfig())
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96, exits=[1],
                         make_vocab_size_divisible_by=64)
    full_state = {n: t + 1e-4 * torch.randn_like(t) for n, t in gather_full_state_dict(NviumModel(config)).items()}
    for result in run_distributed(_masters_worker, 2, zero_stage, full_state, tmp_path):
        assert result["names"] == sorted(full_state)
        assert result["before_off_grid"] == 0  # the engine made its masters from the bf16 weights ...
        assert result["after_equal"]  # ... and holds (and writes) the checkpoint's fp32 values after loading them


@pytest.mark.slow
@pytest.mark.parametrize("event", ["ctrl-c", "launcher-killed"])
def test_ctrl_c_or_a_dead_launcher_checkpoints_and_stops(event, corpus, tmp_path):
    """Ctrl-C reaches torchrun and its workers at once (the terminal signals the whole process group); a
    SIGKILLed torchrun leaves its workers orphaned. Either way the workers finish the step, save and stop."""
    import psutil

    extra = {"training.train_iters": 300, "training.eval_interval": 300, "parallel.zero_stage": 1}
    proc = _torchrun(small_overrides(corpus, tmp_path, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True)
    _wait_for(tmp_path / "metrics.jsonl", proc)
    workers = [psutil.Process(pid) for pid in _workers(proc)]
    if event == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)  # the workers hold the pipe until they exit
    psutil.wait_procs(workers, timeout=60)
    reason = "SIGINT received" if event == "ctrl-c" else f"the launcher (pid {proc.pid}) died"
    assert f"[train] stopping early: {reason}" in out, out
    stopped_at = int(out.split("preempted: checkpoint saved at step")[1].split()[0])
    assert 0 < stopped_at < 300
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    extra["training.train_iters"] = stopped_at + 2
    records, _, resumed = train(2, corpus, tmp_path, **extra)
    assert resumed == stopped_at and sorted(records)[-2:] == [stopped_at + 1, stopped_at + 2]


def test_unusable_training_data_is_named(corpus, tmp_path):
    """An empty dataset, and one (with no tokenizer record) holding an id outside the vocabulary, stop the
    trainer with an error naming the .bin instead of crashing deep in the embedding."""
    import shutil

    import numpy as np

    from trainer_fixtures import train_in_process

    valid = corpus["valid"]
    empty, out_of_range = str(tmp_path / "empty_text_document"), str(tmp_path / "ids_text_document")
    for prefix in (empty, out_of_range):
        shutil.copy(valid + ".idx", prefix + ".idx")
    ids = np.fromfile(valid + ".bin", dtype=np.uint16)
    ids[100] = 600  # the tokenizer has 512 pieces
    ids.tofile(out_of_range + ".bin")
    with open(empty + ".idx", "r+b") as f:  # header: 0 sequences, 1 document boundary
        f.truncate(34)
        f.seek(18)
        f.write((0).to_bytes(8, "little") + (1).to_bytes(8, "little"))
        f.seek(0, 2)
        f.write((0).to_bytes(8, "little"))
    open(empty + ".bin", "wb").close()
    for prefix, message in ((empty, "the dataset is empty"), (out_of_range, "token id 600")):
        overrides = small_overrides(corpus, tmp_path / "run", **{"data.train_data": f"[{prefix}]"})
        with pytest.raises(RuntimeError, match=f"{prefix}.bin: {message}"):
            run_distributed(train_in_process, 1, overrides)


def test_lr_schedules():
    from nvium_dist.config import TrainingConfig
    from nvium_dist.training.schedule import lr_multiplier

    cosine = TrainingConfig(train_iters=100, warmup_fraction=0.1, min_lr_ratio=0.1, lr_schedule="cosine")
    values = [lr_multiplier(s, cosine) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))  # monotone decay after warmup
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = TrainingConfig(train_iters=100, warmup_fraction=0.01, decay_fraction=0.1, min_lr_ratio=0.1, lr_schedule="wsd",
                         wsd_decay="linear")
    assert [lr_multiplier(s, wsd) for s in (0, 50, 89)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(95, wsd) == pytest.approx(0.55) and lr_multiplier(100, wsd) == pytest.approx(0.1)


@pytest.mark.parametrize("steps", [100, 1234, 12207])
def test_wsd_matches_the_papers_schedule(steps):
    """Issue 22 case 15: the default wsd is the paper's code's: transformers' get_wsd_schedule (linear warmup from
    min_lr_ratio x lr, cosine decay) with floor(fraction x steps) warmup and decay steps, at every step."""
    from transformers.optimization import get_wsd_schedule

    from nvium_dist.config import TrainingConfig
    from nvium_dist.training.schedule import lr_multiplier

    config = TrainingConfig(train_iters=steps, warmup_fraction=0.01, decay_fraction=0.1, min_lr_ratio=0.1,
                            lr_schedule="wsd")
    warmup, decay = int(0.01 * steps), int(0.1 * steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                 num_stable_steps=steps - warmup - decay, min_lr_ratio=0.1)
    theirs = []
    for _ in range(steps + 3):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr_multiplier(step, config) for step in range(steps + 3)]
    assert ours == pytest.approx(theirs, abs=1e-12, rel=0)
    assert ours[0] == pytest.approx(0.1 if warmup else 1.0)  # nvium's earlier wsd started near 0


def test_optimizer_offload_and_wandb_offline(corpus, tmp_path, monkeypatch):
    """ZeRO-2 with the optimizer offloaded to CPU trains like the reference; wandb logs offline."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    records, _, _ = train(1, corpus, tmp_path, **{"parallel.zero_stage": 2, "parallel.offload_optimizer": "true",
                                                "training.wandb_project": "nvium-test", "training.train_iters": 2,
                                                "training.eval_interval": 2})
    assert sorted(records) == [1, 2] and all(r["loss"] > 0 for r in records.values())
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb did not write an offline run"


@pytest.mark.slow  # two torchrun processes through the real entry point (~40 s)
def test_training_command_prints_no_third_party_noise(corpus, tmp_path):  # noqa: F811
    """torchrun + ZeRO-2 through the real entry point: no DeepSpeed accelerator warning per rank and no torch
    deprecation warning about DeepSpeed's collectives, only nvium's own lines."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    sets = [arg for kv in small_overrides(corpus, tmp_path / "run", **{"training.train_iters": 2,
                                                                       "training.eval_interval": 2,
                                                                       "parallel.zero_stage": 2})
            for arg in ("--set", kv)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "pretrain/pretrain_nvium.py", "--config", "pretrain/configs/tiny.yaml", *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "[checkpoint] step 2" in output
    for noise in ("real_accelerator", "FutureWarning", "all_gather_into_tensor"):
        assert noise not in output, noise
